"""Which runtimes load an arm's artifact as is: the `runs_on` a run records (no torch, no pydantic;
the atlas, its push API and its pages read it).

A run's result holds `runs_on`, a list with one entry per runtime that loads the arm's quantized
model as it was measured (an empty list: a research format, no runtime kernel):

    {"runtime": "llama.cpp", "format": "gguf", "types": ["q4_k", "q6_k"]}
        every stored tensor is a ggml type llama.cpp loads (or f16 / bf16), with no activation
        quantization other than llama.cpp's own (`act: llamacpp_cpu`) and a KV cache of its cache types
    {"runtime": "vllm", "format": "compressed-tensors", "schemes": ["W4A16"], "min_sm": 80, "gpu": "Ampere"}
        every Linear's compressed-tensors scheme has a vLLM kernel; `min_sm` is the lowest CUDA compute
        capability (×10) whose kernels execute all of them natively, `gpu` its generation

Derived once, when the run is measured (quantatlas/export/runtimes.py), and stored with the run;
the pages filter and draw from what is stored.
"""
from __future__ import annotations

from typing import Any

RUNTIMES = ("llama.cpp", "vllm")
#: the landscape's "deployable on" choices: every arm, or those a runtime loads
DEPLOYABLE = ("any", "llama.cpp", "vllm")
#: CUDA compute capability (major·10 + minor) -> the GPU generation that introduced it
GPU_GENERATIONS: dict[int, str] = {70: "Volta", 75: "Turing", 80: "Ampere", 89: "Ada", 90: "Hopper",
                                   100: "Blackwell"}
#: compressed-tensors schemes vLLM has kernels for, as runs_on names them (export/runtimes.py)
VLLM_SCHEMES = ("unquantized", "W4A16", "W8A16", "W4A16_ASYM", "W8A8", "FP8_W8A16", "FP8_DYNAMIC", "FP8",
                "FP8_BLOCK", "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4")
#: llama.cpp tensor types runs_on may name (ggml weight types llama.cpp loads, and 16-bit floats)
LLAMACPP_TYPES = ("f16", "bf16", "q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0",
                  "iq4_nl", "iq4_xs", "mxfp4")
MAX_ENTRIES = 8


def check_runs_on(value: Any, where: str = "runs_on") -> list[dict]:
    """`value` if it is a well-formed runs_on list, else ValueError naming the field and the value."""
    if not isinstance(value, list) or len(value) > MAX_ENTRIES:
        raise ValueError(f"{where} must be a list of at most {MAX_ENTRIES} runtime entries, got {value!r:.200}")
    seen = set()
    for i, e in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(e, dict) or e.get("runtime") not in RUNTIMES:
            raise ValueError(f"{at}.runtime must be one of {', '.join(RUNTIMES)}, got {e!r:.200}")
        runtime = e["runtime"]
        if runtime in seen:
            raise ValueError(f"{at}.runtime {runtime!r} is listed twice")
        seen.add(runtime)
        if runtime == "llama.cpp":
            _keys(e, at, {"runtime", "format", "types"})
            _exact(e, at, "format", "gguf")
            _names(e.get("types"), at + ".types", LLAMACPP_TYPES)
        else:
            _keys(e, at, {"runtime", "format", "schemes", "min_sm", "gpu"})
            _exact(e, at, "format", "compressed-tensors")
            _names(e.get("schemes"), at + ".schemes", VLLM_SCHEMES)
            sm, gpu = e.get("min_sm"), e.get("gpu")
            if sm is not None and (isinstance(sm, bool) or sm not in GPU_GENERATIONS):
                raise ValueError(f"{at}.min_sm must be one of {sorted(GPU_GENERATIONS)} or null, got {sm!r}")
            if gpu != (GPU_GENERATIONS[sm] if sm is not None else None):
                raise ValueError(f"{at}.gpu must be {GPU_GENERATIONS.get(sm)!r} (the generation of min_sm {sm}), "
                                 f"got {gpu!r}")
    return value


def _keys(e: dict, at: str, allowed: set[str]) -> None:
    extra = sorted(set(e) - allowed)
    if extra:
        raise ValueError(f"{at} has unknown fields {extra} (allowed: {', '.join(sorted(allowed))})")


def _exact(e: dict, at: str, key: str, want: str) -> None:
    if e.get(key) != want:
        raise ValueError(f"{at}.{key} must be {want!r}, got {e.get(key)!r}")


def _names(values: Any, at: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(values, list) or not values or len(values) > len(allowed) \
            or any(v not in allowed for v in values):
        raise ValueError(f"{at} must be a non-empty list of {', '.join(allowed)}; got {values!r:.200}")


def runtimes_of(runs_on: Any) -> frozenset[str]:
    """The runtimes a stored runs_on names (nothing for a missing or malformed value)."""
    if not isinstance(runs_on, list):
        return frozenset()
    return frozenset(e["runtime"] for e in runs_on if isinstance(e, dict) and e.get("runtime") in RUNTIMES)


def runs_on_label(runs_on: Any) -> str:
    """One line for a page: "llama.cpp (q4_k, q6_k) · vLLM W4A16 (Ampere+)", "research format", or
    "not recorded" for a run stored before runs_on existed."""
    if runs_on is None:
        return "not recorded"
    if not isinstance(runs_on, list) or not runs_on:
        return "research format"
    parts = []
    for e in runs_on:
        if e.get("runtime") == "llama.cpp":
            parts.append(f"llama.cpp ({', '.join(e.get('types') or [])})")
        elif e.get("runtime") == "vllm":
            gpu = f" ({e['gpu']}+)" if e.get("gpu") else ""
            parts.append(f"vLLM {', '.join(e.get('schemes') or [])}{gpu}")
    return " · ".join(parts) or "research format"
