"""What an arm is made of, read from its stored config (the validated spec's arm):

    solver:gptq / solver:gptaq     the solver (rtn is the default and no technique)
    transform:<name>               each transform (hadamard, equalize, awq, ...)
    codec:<name>                   the default codec (uniform, turbo, q4_k, ...)
    gguf:<FTYPE>                   a llama.cpp file-type mixture ({gguf: Q4_K_M})
    override:<codec|fp16>          a per-tensor override's codec (fp16: kept unquantized)
    kv, act                        KV-cache / activation quantisation

Pure Python over JSON: no torch, no codec registry.
"""
from __future__ import annotations

import math

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# ggml's quantized tensor types (the gguf package's GGMLQuantizationType with blocks of more than one
# weight, lower case): an arm whose codec is one of these, or a {gguf: ...} mixture, is a llama.cpp
# format and a reference point on the landscape. Our own formats are a subset (a test checks).
GGML_TYPES = frozenset(t.name.lower() for t in GGMLQuantizationType if GGML_QUANT_SIZES[t][0] > 1)

KINDS_ONE_PER_ARM = ("solver", "codec")      # an arm has one solver and one default codec


def codec_label(codec: dict | None) -> str | None:
    """`codec:<name>`, `gguf:<FTYPE>`, or None for an unquantized (fp16) arm."""
    if not codec:
        return None
    name, opts = next(iter(codec.items()))
    if name == "gguf":
        ftype = opts if isinstance(opts, str) else (opts or {}).get("ftype", "?")
        return f"gguf:{str(ftype).upper()}"
    return f"codec:{name}"


def techniques(config: dict | None) -> frozenset[str]:
    """The techniques an arm stacks (see the module doc)."""
    c = config or {}
    out = set()
    solver = c.get("solver") or "rtn"
    if solver != "rtn":
        out.add(f"solver:{solver}")
    for t in c.get("transforms") or []:
        if isinstance(t, dict) and t:
            out.add(f"transform:{next(iter(t))}")
        elif isinstance(t, str):
            out.add(f"transform:{t}")
    label = codec_label(c.get("codec"))
    if label:
        out.add(label)
    for o in c.get("overrides") or []:
        codec = (o or {}).get("codec")
        out.add("override:" + (codec_label(codec).split(":", 1)[1] if codec else "fp16"))
    if c.get("kv"):
        out.add("kv")
    if c.get("act"):
        out.add("act")
    return frozenset(out)


def kind(technique: str) -> str:
    k = technique.split(":", 1)[0]
    return "codec" if k == "gguf" else k


def compatible(a: str, b: str) -> bool:
    """Whether one arm can hold both: not two solvers, not two default codecs."""
    return a != b and not (kind(a) == kind(b) and kind(a) in KINDS_ONE_PER_ARM)


def is_llamacpp_format(config: dict | None) -> bool:
    """A llama.cpp reference point: the codec is a ggml type or a {gguf: ...} mixture."""
    codec = (config or {}).get("codec")
    if not codec:
        return False
    name = next(iter(codec))
    return name == "gguf" or name in GGML_TYPES


def bit_budget(bits_per_weight: float | None) -> int | None:
    """The whole-bit budget a run falls in: floor(bits per weight), so 4.125 (uniform 4-bit with
    group scales) and 4.5 (Q4_K) are both the 4-bit budget, 8.5 (Q8_0) the 8-bit one."""
    if bits_per_weight is None or not math.isfinite(bits_per_weight) or bits_per_weight <= 0:
        return None
    return int(math.floor(bits_per_weight + 1e-9))
