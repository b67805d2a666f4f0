"""`artifact:` — an arm whose weights another tool made: a GGUF file (llama-quantize), a
compressed-tensors folder (llm-compressor), an HF GPTQ checkpoint (AutoGPTQ, GPTQModel, AutoRound's
export) or an AutoAWQ checkpoint (GEMM packing):

    arms:
      llama_q4km: {artifact: {gguf: path/to/model-Q4_K_M.gguf}}
      llmc_w4a16: {artifact: {compressed_tensors: path/to/folder}}
      gptq4:      {artifact: {gptq: path/to/folder}}
      awq4:       {artifact: {awq: path/to/folder}}

A relative path is read from the spec file's folder (`quantatlas.spec.load_spec` writes it out
absolute). What identifies the arm is not where the file is but what it holds: `sha256`, the hash
of its stored tensors and of what decoding them needs (quant/external/stored.py), filled in when the
file is read; written in a spec, it must match the file. `provenance` (the tool, its version, the
scheme) is read from the artifact's metadata where it says, else kept as the author wrote it; it is
shown with the arm and is no part of its identity.

Pydantic only (no torch): the atlas server validates pushed specs with this class.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

#: the formats an artifact arm reads, as spec keys
FORMATS: tuple[str, ...] = ("gguf", "compressed_tensors", "gptq", "awq")
#: what a tool writes in each format (shown where the artifact does not say)
FORMAT_NAMES = {"gguf": "GGUF", "compressed_tensors": "compressed-tensors", "gptq": "GPTQ (HF checkpoint)",
                "awq": "AWQ (AutoAWQ GEMM)"}
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAX_PATH = 4096


class Provenance(BaseModel):
    """Who made the artifact, as far as it (or its author) says."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    tool: str | None = Field(None, max_length=200)
    version: str | None = Field(None, max_length=100)
    scheme: str | None = Field(None, max_length=500)

    @model_serializer(mode="wrap")
    def _dump(self, handler, info):
        return {k: v for k, v in handler(self).items() if v is not None}

    def filled_from(self, read: "Provenance") -> "Provenance":
        """This provenance with what it leaves unsaid taken from `read` (the artifact's own metadata)."""
        return Provenance(**{k: getattr(self, k) if getattr(self, k) is not None else getattr(read, k)
                             for k in type(self).model_fields})


class ArtifactConfig(BaseModel):
    """`artifact: {<format>: PATH, sha256: HEX, provenance: {tool, version, scheme}}`: exactly one format."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    gguf: str | None = Field(None, min_length=1, max_length=MAX_PATH, description="a .gguf file")
    compressed_tensors: str | None = Field(None, min_length=1, max_length=MAX_PATH,
                                           description="a folder with config.json and *.safetensors")
    gptq: str | None = Field(None, min_length=1, max_length=MAX_PATH, description="an HF GPTQ checkpoint folder")
    awq: str | None = Field(None, min_length=1, max_length=MAX_PATH, description="an AutoAWQ checkpoint folder")
    sha256: str | None = Field(None, pattern=SHA256_PATTERN, description="sha256 of the stored tensors (64 hex)")
    provenance: Provenance | None = None

    @model_validator(mode="after")
    def _one_format(self):
        given = [f for f in FORMATS if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"an artifact is exactly one of {', '.join(FORMATS)} (a path), got "
                             + (", ".join(given) if given else "none"))
        return self

    @property
    def format(self) -> str:
        return next(f for f in FORMATS if getattr(self, f) is not None)

    @property
    def path(self) -> str:
        return getattr(self, self.format)

    @model_serializer(mode="wrap")
    def _dump(self, handler, info):
        """Only what is set: `{gguf: PATH, sha256: HEX, provenance: {...}}`."""
        d = handler(self)
        return {k: v for k, v in d.items() if v is not None}

    def identity(self) -> dict:
        """What identifies the arm's weights: the tensors' hash; an artifact not read yet (no sha256: a
        spec whose file is elsewhere) stands for its path until it is."""
        return {"sha256": self.sha256} if self.sha256 is not None else {self.format: self.path}
