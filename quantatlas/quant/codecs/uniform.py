"""Round-to-nearest uniform integer grid with fp16 scales (and fp16 zero points when asymmetric).

symmetric:  w_hat = s * q,        q in [-2^(b-1), 2^(b-1) - 1],  s = clip * max|w| / (2^(b-1) - 1)
asymmetric: w_hat = s * (q - z),  q in [0, 2^b - 1],            s = clip * (max - min) / (2^b - 1),
            z = round(-clip * min / s)

`clip` is 1 for `clip: minmax`; `mse` and `hessian` search a grid of shrink factors per row
of each group, minimising sum_j imp_j (w_j - w_hat_j)^2 with imp = 1 (mse) or imp = diag(H)
(hessian, passed in as `importance`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantatlas.quant.codecs import register
from quantatlas.quant.codecs.base import Codec, Packed, pack_bits, unpack_bits

CLIP_GRID = torch.linspace(1.0, 0.5, 26)


@dataclass
class UniformParams:
    scale: torch.Tensor  # [rows], already rounded to fp16
    zero: torch.Tensor | None  # [rows] integer-valued, asymmetric only


@register
class Uniform(Codec):
    name = "uniform"

    def __init__(self, bits: int = 4, group: int | None = 128, symmetric: bool = True, clip: str = "minmax"):
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"uniform.bits must be an integer from 2 to 8, got {bits!r}")
        if group is not None and (not isinstance(group, int) or group <= 0):
            raise ValueError(f"uniform.group must be a positive integer or null (per row), got {group!r}")
        if clip not in ("minmax", "mse", "hessian"):
            raise ValueError(f"uniform.clip must be minmax, mse or hessian, got {clip!r}")
        self.bits, self.group_size, self.symmetric, self.clip = bits, group, symmetric, clip

    def config(self):
        return {"bits": self.bits, "group": self.group_size, "symmetric": self.symmetric, "clip": self.clip}

    # -- grid -----------------------------------------------------------------------------
    def _levels(self) -> tuple[int, int]:
        if self.symmetric:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def _params(self, w: torch.Tensor, shrink: torch.Tensor) -> UniformParams:
        """Parameters for each row of w [rows, g] at shrink factors [rows] (or [k, rows])."""
        lo, hi = self._levels()
        if self.symmetric:
            amax = w.abs().amax(-1) * shrink
            scale = (amax / hi).half().float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            return UniformParams(scale, None)
        wmin = torch.minimum(w.amin(-1), torch.zeros_like(w[..., 0])) * shrink
        wmax = torch.maximum(w.amax(-1), torch.zeros_like(w[..., 0])) * shrink
        scale = ((wmax - wmin) / hi).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-wmin / scale).clamp(lo, hi)
        return UniformParams(scale, zero)

    def _round(self, w: torch.Tensor, p: UniformParams) -> torch.Tensor:
        lo, hi = self._levels()
        s = p.scale.unsqueeze(-1)
        if p.zero is None:
            return torch.clamp(torch.round(w / s), lo, hi) * s
        z = p.zero.unsqueeze(-1)
        return (torch.clamp(torch.round(w / s) + z, lo, hi) - z) * s

    # -- codec steps ------------------------------------------------------------------------
    def fit(self, w, importance=None):
        w = w.float()
        rows = w.shape[0]
        if self.clip == "minmax":
            return self._params(w, torch.ones(rows, device=w.device))
        imp = torch.ones(w.shape[1], device=w.device) if self.clip == "mse" or importance is None \
            else importance.float().to(w.device)
        grid = CLIP_GRID.to(w.device)
        shrink = grid[:, None].expand(len(grid), rows)                   # [k, rows]
        p = self._params(w.unsqueeze(0).expand(len(grid), *w.shape), shrink)
        err = ((self._round(w.unsqueeze(0), p) - w) ** 2 * imp).sum(-1)  # [k, rows]
        best = err.argmin(0)
        idx = torch.arange(rows, device=w.device)
        return UniformParams(p.scale[best, idx], None if p.zero is None else p.zero[best, idx])

    def quantize(self, w, params, col=0):
        return self._round(w.float(), params)

    def pack(self, w_hat, params):
        rows, cols = w_hat.shape
        g = self.group_of(cols)
        lo, _ = self._levels()
        scale = torch.stack([p.scale for p in params], 1)                  # [rows, groups]
        s = scale.repeat_interleave(g, 1)
        q = torch.round(w_hat.float() / s)
        data = {"scale": scale.half()}
        if not self.symmetric:
            zero = torch.stack([p.zero for p in params], 1)
            q = q + zero.repeat_interleave(g, 1)
            data["zero"] = zero.half()
        data["codes"] = pack_bits((q - lo).to(torch.int64), self.bits)
        return Packed(self.name, self.config(), (rows, cols), data)

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        lo, _ = self._levels()
        q = unpack_bits(packed.data["codes"], self.bits, rows * cols).reshape(rows, cols).float() + lo
        s = packed.data["scale"].float().repeat_interleave(g, 1)
        if "zero" in packed.data:
            q = q - packed.data["zero"].float().repeat_interleave(g, 1)
        return q * s
