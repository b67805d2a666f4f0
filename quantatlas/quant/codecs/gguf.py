"""`{gguf: Q4_K_M}` / `{gguf: {ftype: Q4_K_M, imatrix: true}}`: llama-quantize's per-tensor mixture
of ggml types (quantatlas.quant.gguf_mix) in the place of one codec."""
from __future__ import annotations

from pydantic import model_validator

from quantatlas.quant.config import CodecConfig


class GGUFConfig(CodecConfig):
    name = "gguf"
    ftype: str
    imatrix: bool = False

    @classmethod
    def from_string(cls, ftype: str) -> dict:
        return {"ftype": ftype}

    @model_validator(mode="after")
    def _known(self):
        self.build()  # GGUFMixture checks the file type and its imatrix rule
        return self

    @property
    def seeded(self) -> bool:  # an imatrix comes from the seeded calibration draw
        return self.imatrix

    def build(self):
        from quantatlas.quant.gguf_mix import GGUFMixture

        return GGUFMixture(self.ftype, self.imatrix)
