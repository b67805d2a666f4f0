"""C float32 semantics that ggml's reference quantization depends on, as torch ops.

Byte-exact agreement with ggml needs its arithmetic, not just its formulas:
- every operation in fp32, one IEEE rounding each, in C's evaluation order (a*b*c is (a*b)*c);
- sums accumulated left to right (`seq_sum`), not tree-reduced;
- divisions as true divisions (torch turns `scalar / tensor` into reciprocal * scalar, and CUDA
  turns `tensor / cpu_scalar` into a multiply by the reciprocal, so `fdiv` makes both sides
  device tensors);
- correctly rounded sqrt (`sqrtf`; torch's vectorised CPU sqrt is not);
- ggml's rounding helpers: `nearest_int` (the 12582912 trick), C's `roundf` and integer casts;
- running max/min that keep the first element reaching the extreme (it decides the sign of d).
This is ggml-quants.c built as plain fp32 C (no FMA contraction, as an x86-64 baseline build of
ggml-base); a build that fuses a*b + c into FMAs (-march=native with -ffp-contract=fast, or clang
on arm64) rounds differently and makes different choices in near-tie searches.
"""
from __future__ import annotations

import numpy as np
from quantatlas._lazy import torch

#: ggml's GROUP_MAX_EPS: blocks whose largest magnitude is below it count as all zero.
GROUP_MAX_EPS = float(np.float32(1e-15))


def f32(expr: float) -> float:
    """A Python float holding the fp32 value of a constant expression (exactly representable)."""
    return float(np.float32(expr))


def fdiv(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """a / b as an fp32 IEEE division, element by element, on either device."""
    if not torch.is_tensor(a):
        a = torch.full_like(b, a)
    if not torch.is_tensor(b):
        b = torch.full_like(a, b)
    return torch.div(a, b)


def nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: add 1.5*2^23 in fp32 and read the low mantissa bits (int32).

    Round-half-to-even for |f| < 2^22; reproduces ggml's result bit for bit outside that range too
    (ggml asserts the range only in debug builds).
    """
    v = f.float() + 12582912.0
    return (v.view(torch.int32) & 0x007FFFFF) - 0x00400000


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero, exact for every float (floor(|x| + 0.5) is not)."""
    t = torch.trunc(x)
    return t + torch.sign(x) * ((x - t).abs() >= 0.5).to(x.dtype)


def trunc_int(x: torch.Tensor) -> torch.Tensor:
    """A C cast of float to an integer type: truncation toward zero (in-range values)."""
    return torch.trunc(x).to(torch.int32)


def sqrtf(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt (torch's vectorised CPU sqrt is not): via fp64, where the
    second rounding is harmless for sqrt."""
    return torch.sqrt(x.double()).float()


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16: round to nearest even (overflow to inf), as a float16 tensor."""
    return x.float().half()


def seq_sum(t: torch.Tensor, dim: int = -1, start_with_first: bool = False) -> torch.Tensor:
    """sum = 0; for i: sum += t[i] -- left to right in fp32 along `dim`.

    `start_with_first`: C's `sum = t[0]; for i >= 1 ...` (differs only in the sign of a zero sum).
    Fastest along dim 0 of a contiguous tensor (each step adds a contiguous slice).
    """
    parts = t.unbind(dim)
    acc = parts[0].clone() if start_with_first else parts[0] + 0.0
    for p in parts[1:]:
        acc += p
    return acc


def _first(x: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """x at the first position where `hit` is true, along the last dim."""
    idx = hit.to(torch.int8).argmax(-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


def c_max(x: torch.Tensor) -> torch.Tensor:
    """max = x[0]; if (x[i] > max) max = x[i];  (the first element equal to the maximum)."""
    return _first(x, x == x.amax(-1, keepdim=True))


def c_min(x: torch.Tensor) -> torch.Tensor:
    """min = x[0]; if (x[i] < min) min = x[i];"""
    return _first(x, x == x.amin(-1, keepdim=True))


def c_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """amax = 0, max = 0; if (|x[i]| > amax) { amax = |x[i]|; max = x[i]; }  -> (amax, max)."""
    ax = x.abs()
    amax = ax.amax(-1)
    first = _first(x, ax == amax[..., None])
    return amax, torch.where(amax > 0, first, torch.zeros_like(first))


_TABLES: dict = {}


def _floor2_tables(values: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and level of best_index_int8 for each floor(x + x) in -256..256."""
    key = (tuple(values), str(device))
    if key not in _TABLES:
        mids = torch.tensor([float(a + b) for a, b in zip(values[:-1], values[1:])], device=device)
        grid = torch.arange(-256, 257, dtype=torch.float32, device=device)
        index = (grid[:, None] >= mids).sum(-1).to(torch.int32)
        _TABLES[key] = index, torch.tensor(values, dtype=torch.float32, device=device)[index]
    return _TABLES[key]


def _floor2_slot(x: torch.Tensor) -> torch.Tensor:
    t = (x + x).floor_().clamp_(-256, 256).nan_to_num_(-256.0)
    return t.to(torch.int32) + 256


def best_index_int8(values: list[int], x: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8: the level of the sorted int8 table nearest x, ties upward (int32).

    ggml's branchless binary search compares x + x with the integer sums of neighbouring levels
    (exact midpoints); for sorted levels its answer is how many midpoints x + x reaches, and as the
    midpoints are integers that count depends only on floor(x + x): a 513-entry lookup table
    (nan -> 0 as in ggml, where every comparison is false).
    """
    return _floor2_tables(values, x.device)[0][_floor2_slot(x)]


def best_level(values: list[int], x: torch.Tensor) -> torch.Tensor:
    """values[best_index_int8(values, x)] as float32, in one lookup."""
    return _floor2_tables(values, x.device)[1][_floor2_slot(x)]
