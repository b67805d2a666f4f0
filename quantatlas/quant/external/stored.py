"""What an artifact stores, read without decoding anything (and without torch): its tensors (name,
stored dtype, shape, bytes and where they lie), the files its bytes are counted from, its
architecture, the parameters its decoding needs and its provenance; and its content hash.

    listing = read_listing("gguf", Path("model-Q4_K_M.gguf"))
    listing.tensors["blk.0.attn_q.weight"]      StoredTensor(dtype="Q4_K", shape=(256, 256), nbytes=..., ...)
    listing.sha256()                            the arm's identity (below)

Stored tensors, by format:

    gguf                the file's tensors; dtype the ggml type (F32, F16, Q4_K, ...), shape [rows, cols]
                        (GGUF's ne reversed: the shape the dequantized tensor has); bytes as ggml's type sizes
    compressed_tensors  every tensor of the folder's *.safetensors (weight_packed, weight_scale, ...)
    gptq, awq           likewise (qweight, qzeros, scales, g_idx, and the fp tensors)

The content hash (`sha256`) is over, in this order: the canonical JSON of the format and the decoding
parameters (`decode`: what turns the stored tensors into weights and is not a tensor: GPTQ's bits,
group size and checkpoint format; AWQ's bits, group size, zero point and kernel layout;
compressed-tensors' config groups, format and ignore list; GGUF's architecture), then for each tensor
in name order the canonical JSON of [name, dtype, shape, nbytes] and its bytes. So it names what the
arm's weights are, wherever the file lies and whatever the file's free metadata says (a model name, a
date): the same quantization measured by two contributors is one arm.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from quantatlas.canonical import canonical_json
from quantatlas.errors import UserError
from quantatlas.quant.external.config import FORMAT_NAMES, ArtifactConfig, Provenance

#: stored dtypes that hold plain numbers (a tensor stored so is not quantized)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
CHUNK = 1 << 24


class ArtifactError(UserError):
    """An artifact that cannot be read as its format (the message names the file or tensor)."""


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str                # safetensors' dtype name (F16, I32, ...) or the ggml type (Q4_K, F32, ...)
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    offset: int               # of its first byte in `file`


@dataclass
class Listing:
    format: str
    path: Path
    tensors: dict[str, StoredTensor]
    files: list[Path]                          # whose bytes are the artifact's (bytes_file, zstd, brotli)
    arch: str | None                           # the architecture the artifact says it is
    decode: dict                               # decoding parameters that are not tensors (hashed)
    provenance: Provenance
    config: dict = field(default_factory=dict)  # the folder's config.json (HF formats)

    @property
    def bytes_stored(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def sha256(self) -> str:
        """The content hash (module docstring), computed once per file state in this process."""
        key = (self.format, str(self.path), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files))
        if key not in _HASHES:
            h = hashlib.sha256(canonical_json({"format": self.format, "decode": self.decode}).encode())
            for name in sorted(self.tensors):
                t = self.tensors[name]
                h.update(canonical_json([t.name, t.dtype, list(t.shape), t.nbytes]).encode())
                for chunk in read_bytes(t):
                    h.update(chunk)
            _HASHES[key] = h.hexdigest()
        return _HASHES[key]


_HASHES: dict[tuple, str] = {}


def read_bytes(t: StoredTensor):
    """A stored tensor's bytes, in chunks."""
    with open(t.file, "rb") as fh:
        fh.seek(t.offset)
        left = t.nbytes
        while left:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                raise ArtifactError(f"{t.file}: tensor {t.name} is cut short ({left} of its {t.nbytes} bytes missing)")
            left -= len(chunk)
            yield chunk


def read_listing(fmt: str, path: Path) -> Listing:
    """The listing of the artifact at `path` in format `fmt` (raises ArtifactError naming what is wrong)."""
    if fmt == "gguf":
        return _gguf_listing(path)
    if fmt in ("compressed_tensors", "gptq", "awq"):
        return _folder_listing(fmt, path)
    raise ArtifactError(f"unknown artifact format {fmt!r}")


# ---- GGUF ------------------------------------------------------------------------------------------

def _gguf_listing(path: Path) -> Listing:
    import gguf

    if not path.is_file():
        raise ArtifactError(f"{path}: a GGUF artifact is a file")
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:   # the reader raises ValueError, struct errors, ...: the file is not GGUF
        raise ArtifactError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def meta(key: str):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    tensors = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        tensors[t.name] = StoredTensor(t.name, t.tensor_type.name, shape, int(t.n_bytes), path, int(t.data_offset))
    arch = meta("general.architecture")
    file_type = meta("general.file_type")
    ftype = None
    if file_type is not None:
        try:
            ftype = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (ValueError, TypeError):   # a number llama.cpp does not name, or not a number at all
            ftype = f"file type {file_type}"
    scheme = ", ".join(x for x in [ftype, "imatrix" if meta("quantize.imatrix.file") is not None
                                   or meta("quantize.imatrix.dataset") is not None else None] if x) or None
    qv = meta("general.quantization_version")
    by = meta("general.quantized_by")
    prov = provenance(tool=f"GGUF, quantized by {by}" if by else "GGUF (tool not recorded)",
                      version=None if qv is None else f"ggml quantization version {qv}", scheme=scheme)
    return Listing("gguf", path, tensors, [path], arch, {"architecture": arch}, prov)


# ---- safetensors folders ---------------------------------------------------------------------------

def safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one .safetensors file, from its JSON header."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            size = os.fstat(fh.fileno()).st_size
            # a length past the end would read a cut header, which may still parse (its tensors then
            # look cut short): the length itself is what is wrong
            if 8 + n > size:
                raise ValueError(f"its first 8 bytes declare a header of {n} bytes, the file holds {size} bytes")
            if n > 100_000_000:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, RecursionError, struct.error) as e:   # RecursionError: JSON nested too deep
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    start = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            if not 0 <= begin <= end:
                raise ValueError(f"data_offsets {[begin, end]} is no byte range")
            out[name] = StoredTensor(name, str(info["dtype"]), tuple(int(x) for x in info["shape"]), end - begin,
                                     path, start + begin)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: tensor {name}: not a safetensors header entry (dtype, shape, "
                                f"data_offsets): {type(e).__name__} {e}") from None
    return out


def _json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(out, dict):
        raise ArtifactError(f"{path}: a JSON object expected, found {type(out).__name__}")
    return out


def quantization_config(folder: Path, config: dict) -> dict:
    """config.json's quantization_config, else a tool's own file beside it (AutoGPTQ's quantize_config.json,
    AutoAWQ's quant_config.json)."""
    q = config.get("quantization_config")
    if isinstance(q, dict):
        return q
    if q is not None:   # null reads as absent; anything else would be dropped and refused for what it lacks
        raise ArtifactError(f"{folder / 'config.json'}: quantization_config: a JSON object expected, found "
                            f"{type(q).__name__} ({clip(repr(q), 60)})")
    for name in ("quantize_config.json", "quant_config.json"):
        if (folder / name).is_file():
            return _json(folder / name)
    return {}


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def provenance(tool: str | None, version: str | None, scheme: str | None) -> Provenance:
    """Provenance from an artifact's free metadata, each field cut to the length Provenance holds (it is
    shown, never part of the arm's identity: a long version string is no reason to refuse the artifact)."""
    values = {"tool": tool, "version": version, "scheme": scheme}
    limits = {k: next(m.max_length for m in f.metadata if hasattr(m, "max_length"))
              for k, f in Provenance.model_fields.items()}
    return Provenance(**{k: None if v is None else clip(v, limits[k]) for k, v in values.items()})


def _folder_listing(fmt: str, folder: Path) -> Listing:
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: a {FORMAT_NAMES[fmt]} artifact is a folder (config.json and *.safetensors)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ArtifactError(f"{folder}: no *.safetensors files (a .bin checkpoint is not read; save it as safetensors)")
    tensors: dict[str, StoredTensor] = {}
    for f in files:
        for name, t in safetensors_header(f).items():
            if name in tensors:
                raise ArtifactError(f"{folder}: tensor {name} is stored twice ({tensors[name].file.name}, {f.name})")
            tensors[name] = t
    config = _json(folder / "config.json") if (folder / "config.json").is_file() else {}
    q = quantization_config(folder, config)
    decode, prov = _FOLDER_FORMATS[fmt](q, folder)
    return Listing(fmt, folder, tensors, files, config.get("model_type"), decode, prov, config)


def _method(q: dict, want: str, folder: Path, fmt: str) -> None:
    method = str(q.get("quant_method", "")).lower().replace("_", "-")
    if method != want:
        raise ArtifactError(f"{folder}: a {FORMAT_NAMES[fmt]} artifact needs quantization_config.quant_method "
                            f"{want!r} in config.json, found {q.get('quant_method')!r}")


def _int(q: dict, folder: Path, *keys: str) -> int:
    for k in keys:
        if isinstance(q.get(k), int) and not isinstance(q.get(k), bool):
            return q[k]
    raise ArtifactError(f"{folder}: quantization_config has no integer {' / '.join(keys)}")


def _gptq(q: dict, folder: Path) -> tuple[dict, Provenance]:
    _method(q, "gptq", folder, "gptq")
    fmt = str(q.get("checkpoint_format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ArtifactError(f"{folder}: GPTQ checkpoint_format {fmt!r} is not read (gptq, gptq_v2: the "
                            "qweight/qzeros/scales/g_idx layout; marlin and other kernel layouts are not)")
    bits, group = _int(q, folder, "bits"), _int(q, folder, "group_size")
    if bits not in (2, 3, 4, 8):
        raise ArtifactError(f"{folder}: GPTQ bits {bits} (read: 2, 3, 4, 8)")
    tool, version = None, None
    quantizer = (q.get("meta") or {}).get("quantizer") if isinstance(q.get("meta"), dict) else None
    if isinstance(quantizer, list) and quantizer:
        tool, _, version = str(quantizer[0]).partition(":")
    elif q.get("autoround_version"):
        tool, version = "auto-round", str(q["autoround_version"])
    scheme = (f"int{bits} group {group} {'sym' if q.get('sym', True) else 'asym'}"
              f"{' desc_act' if q.get('desc_act') else ''}, checkpoint_format {fmt}")
    return ({"bits": bits, "group_size": group, "checkpoint_format": fmt},
            provenance(tool=tool or "GPTQ (tool not recorded)", version=version or None, scheme=scheme))


def _awq(q: dict, folder: Path) -> tuple[dict, Provenance]:
    _method(q, "awq", folder, "awq")
    bits, group = _int(q, folder, "bits", "w_bit"), _int(q, folder, "group_size", "q_group_size")
    version = str(q.get("version", "gemm")).lower()
    zero = q.get("zero_point", True)
    if version != "gemm" or bits != 4 or zero is not True:
        raise ArtifactError(f"{folder}: AWQ version {version!r}, bits {bits}, zero_point {zero!r}: read is AutoAWQ's "
                            "GEMM layout with 4-bit codes and zero points")
    tool, tool_version = "AutoAWQ-format", None
    if q.get("autoround_version"):
        tool, tool_version = "auto-round", str(q["autoround_version"])
    return ({"bits": bits, "group_size": group, "version": version, "zero_point": True},
            provenance(tool=tool, version=tool_version, scheme=f"int{bits} group {group} zero point, GEMM"))


def _compressed_tensors(q: dict, folder: Path) -> tuple[dict, Provenance]:
    _method(q, "compressed-tensors", folder, "compressed_tensors")
    if q.get("transform_config"):
        raise ArtifactError(f"{folder}: the compressed-tensors config applies transforms (transform_config: online "
                            "rotations), which an artifact arm does not run")
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise ArtifactError(f"{folder}: quantization_config has no config_groups")
    parts = []
    for name, g in groups.items():
        if not isinstance(g or {}, dict) or not isinstance((g or {}).get("weights") or {}, dict):
            raise ArtifactError(f"{folder}: quantization_config.config_groups.{name} is not a scheme (an object "
                                "with weights)")
        w = (g or {}).get("weights") or {}
        a = (g or {}).get("input_activations")
        if a is not None and not isinstance(a, dict):
            raise ArtifactError(f"{folder / 'config.json'}: quantization_config.config_groups.{name}.input_activations:"
                                f" a JSON object expected, found {type(a).__name__} ({clip(repr(a), 60)})")
        part = f"weights {w.get('type', '?')}{w.get('num_bits', '?')} {w.get('strategy', '')}"
        if w.get("group_size"):
            part += f" {w['group_size']}"
        part += " sym" if w.get("symmetric", True) else " asym"
        if a:
            part += (f", activations {a.get('type', '?')}{a.get('num_bits', '?')} "
                     f"{'dynamic' if a.get('dynamic') else 'static'} {a.get('strategy', '')}")
        parts.append(part.strip())
    scheme = "; ".join(parts) + f" ({q.get('format', '?')})"
    decode = {"config_groups": groups, "format": q.get("format"), "ignore": q.get("ignore") or [],
              "kv_cache_scheme": q.get("kv_cache_scheme")}
    version = q.get("version")
    return decode, provenance(tool="compressed-tensors", version=None if version is None else str(version),
                              scheme=scheme)


_FOLDER_FORMATS = {"gptq": _gptq, "awq": _awq, "compressed_tensors": _compressed_tensors}


# ---- resolving an arm's artifact -------------------------------------------------------------------

def absolute(path: str, base: Path | None) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() or base is None else Path(os.path.abspath(base / p))


def resolve(cfg: ArtifactConfig, base: Path | None, field: str, require: bool) -> ArtifactConfig:
    """`cfg` with its path absolute (a relative one read from `base`) and, where the artifact is there,
    its content hash and provenance filled in. A hash written in the spec must be the artifact's. A
    missing artifact is refused when `require` (a spec about to run), else left as it is."""
    fmt = cfg.format
    path = absolute(cfg.path, base)
    where = f"{field}.{fmt}"
    if not path.exists():
        if require:
            relative = not Path(os.path.expanduser(cfg.path)).is_absolute()
            raise UserError(f"{where}: no such {'file' if fmt == 'gguf' else 'folder'}: {path}"
                            + (f" (a relative path is read from {base})" if relative and base else ""), where)
        return cfg.model_copy(update={fmt: str(path)})
    try:
        listing = read_listing(fmt, path)
        sha = listing.sha256()
    except ArtifactError as e:
        raise UserError(f"{where}: {e}", where) from None
    if cfg.sha256 is not None and cfg.sha256 != sha:
        raise UserError(f"{field}.sha256: {cfg.sha256} is not the artifact's: its tensors hash to {sha} (the file "
                        "changed, or the spec names another one)", f"{field}.sha256")
    prov = (cfg.provenance or Provenance()).filled_from(listing.provenance)
    return cfg.model_copy(update={fmt: str(path), "sha256": sha, "provenance": prov})
