"""Gaussian-codebook codecs: `turbo` (the TurboQuant/PolarQuant recipe on weights) and `lloyd_max`.

turbo, per row of each column group w ∈ R^g:
    ν   = ‖w‖                                  (only used to normalise)
    z   = √g · Q (w / ν),  Q = H_g·diag(s)/√g   (randomized Hadamard, signs s from `seed`)
    k_j = nearest Lloyd-Max level to z_j        (`bits` per coordinate)
    ŵ   = σ · Qᵀ ẑ,  ẑ = levels[k]
    σ   = ν / ‖ẑ‖       with the norm correction: ‖ŵ‖ = ‖w‖ (up to the fp16 rounding of σ)
          ν / √g        without it (norm_correction: false), i.e. ŵ = ν · Qᵀ ẑ / √g
After the rotation, z/√g is a uniformly rotated unit vector (exactly so for a Haar rotation,
closely for a randomized Hadamard), so each z_j follows the sphere marginal of dimension g,
E[z_j²] = 1, ≈ N(0, 1). `codebook: sphere` (default) uses the Lloyd-Max codebook of that exact
marginal, √g-scaled; `codebook: gaussian` uses the N(0, 1) one.

Stored per matrix: the codes (`bits` per weight, bit-packed), one fp16 σ per row and group,
and the 8-byte seed from which the signs are regenerated. The norm correction costs nothing:
we store σ, which already folds ‖w‖/‖ẑ‖ in, instead of ‖w‖. Bits per weight are therefore
bits + 16/g + 64/(rows·cols). Codebooks are functions of (bits, g, codebook) and are not stored.

turbo quantizes a whole group at once (block_width = group_size), so GPTQ-style solvers must
hand it complete groups. `importance` is not used.

lloyd_max: the same Gaussian Lloyd-Max levels without any rotation, one fp16 scale per row and
group: σ = RMS of the group (`scale: rms`) or max|w| / (largest level) (`scale: absmax`);
ŵ_j = σ · levels[nearest level to w_j / σ]. A scalar codec (block_width = 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from quantatlas._lazy import torch
from quantatlas.context import RunContext
from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.config import CodecConfig
from quantatlas.quant.hadamard import RandomizedHadamard, has_hadamard
from quantatlas.quant.lloyd_max import codebook

FP16_MAX = 65504.0
SEED_BYTES = 8


class TurboConfig(CodecConfig):
    name = "turbo"
    seeded = True
    act_order_helps = False   # 3-bit +5 % KLD with act_order + static_groups (defaults_codecs.yaml, seed 0)
    bits: int = Field(ge=1, le=8)
    group: int = Field(128, ge=2)
    seed: int = Field(0, ge=0, lt=2 ** 63)
    codebook: Literal["sphere", "gaussian"] = "sphere"
    norm_correction: bool = True

    @field_validator("group")
    @classmethod
    def _hadamard_size(cls, g):
        if not has_hadamard(g):
            raise ValueError(f"needs a Hadamard matrix of this size (m·2^k, e.g. 64, 128, 256, 96 = 12·8), got {g}")
        return g

    def build(self):
        return Turbo(self)


class LloydMaxConfig(CodecConfig):
    name = "lloyd_max"
    bits: int = Field(ge=1, le=8)
    group: int | None = Field(128, gt=0)
    scale: Literal["rms", "absmax"] = "rms"

    def build(self):
        return LloydMax(self)


def _nearest(z: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level, given the midpoints between ascending levels."""
    return torch.bucketize(z.contiguous(), thresholds)


class _Levels:
    """A codebook's levels and thresholds as tensors, per device."""

    def __init__(self, levels, thresholds):
        self._cpu = tuple(torch.tensor(np.array(a), dtype=torch.float32) for a in (levels, thresholds))
        self._dev: dict = {}

    def on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._dev:
            self._dev[key] = tuple(t.to(device) for t in self._cpu)
        return self._dev[key]


@dataclass
class TurboParams:
    norm: torch.Tensor   # [rows] ‖w‖ of the group as `fit` saw it (normalises; not stored)
    scale: torch.Tensor  # [rows] σ, rounded to fp16 (stored)


class Turbo(Codec):
    name = "turbo"

    def __init__(self, cfg: TurboConfig):
        super().__init__(cfg)
        bits, group, codebook = cfg.bits, cfg.group, cfg.codebook
        self.bits, self.group_size, self.seed = bits, group, cfg.seed
        self.codebook, self.norm_correction = codebook, cfg.norm_correction
        self.block_width = group
        self.rotation = RandomizedHadamard(group, cfg.seed)
        root = math.sqrt(group)
        cb = codebook_for(bits, group, codebook)
        self.levels = _Levels(cb.levels * (root if codebook == "sphere" else 1.0),
                              cb.thresholds * (root if codebook == "sphere" else 1.0))

    def for_run(self, ctx: RunContext) -> "Turbo":
        """Run seed s draws the signs from `seed + s` (the context's "offset" derivation; run seed 0 is the
        spec's own `seed`); the run codec's config holds it, so its packs decode on their own."""
        seed = ctx.sub_seed("offset", self.seed)
        return self if seed == self.seed else Turbo(self.cfg.model_copy(update={"seed": seed}))

    # -- the recipe ------------------------------------------------------------------------
    def _codes(self, w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Codes of rows w [rows, g] normalised by `norm` [rows]."""
        _, thresholds = self.levels.on(w.device)
        inv = torch.where(norm > 0, math.sqrt(self.group_size) / norm.clamp_min(1e-30), torch.zeros_like(norm))
        z = self.rotation.rotate(w) * inv[:, None]
        return _nearest(z, thresholds)

    def _reconstruct(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        levels, _ = self.levels.on(codes.device)
        return self.rotation.unrotate(levels[codes]) * scale[..., None]

    def fit(self, w, importance=None):
        w = w.float()
        norm = w.norm(dim=1)
        z_hat = self.levels.on(w.device)[0][self._codes(w, norm)]
        if self.norm_correction:
            z_norm = z_hat.norm(dim=1)
            scale = torch.where(z_norm > 0, norm / z_norm.clamp_min(1e-30), torch.zeros_like(norm))
        else:
            scale = norm / math.sqrt(self.group_size)
        return TurboParams(norm, scale.clamp(max=FP16_MAX).half().float())

    def quantize(self, w, params, col=0):
        if col != 0 or w.shape[1] != self.group_size:
            raise ValueError(f"turbo quantizes whole groups: got columns {col}..{col + w.shape[1]} of a group of "
                             f"{self.group_size} (a solver must pass block_width = group_size columns)")
        codes = self._codes(w.float(), params.norm)
        return Quantized(self._reconstruct(codes, params.scale), codes)

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        scale = torch.stack([p.scale for p in params], 1)                   # [rows, groups]
        return Packed(self.name, self.config(), (rows, cols), {
            "codes": pack_bits(codes, self.bits),
            "scale": scale.half(),
            "seed": torch.tensor([self.seed], dtype=torch.int64),
        })

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        if int(packed.data["seed"][0]) != self.seed:
            raise ValueError(f"turbo: packed seed {int(packed.data['seed'][0])} differs from this codec's {self.seed}")
        codes = unpack_bits(packed.data["codes"], self.bits, rows * cols).reshape(rows, cols // g, g)
        codes = codes.to(packed.data["scale"].device)
        return self._reconstruct(codes, packed.data["scale"].float()).reshape(rows, cols)


def codebook_for(bits: int, group: int, kind: str):
    return codebook(bits, "sphere", group) if kind == "sphere" else codebook(bits, "gaussian")


class LloydMax(Codec):
    name = "lloyd_max"

    def __init__(self, cfg: LloydMaxConfig):
        super().__init__(cfg)
        self.bits, self.group_size, self.scale = cfg.bits, cfg.group, cfg.scale
        cb = codebook(cfg.bits, "gaussian")
        self.levels = _Levels(cb.levels, cb.thresholds)
        self.top = float(cb.levels[-1])

    def fit(self, w, importance=None):
        w = w.float()
        s = w.pow(2).mean(1).sqrt() if self.scale == "rms" else w.abs().amax(1) / self.top
        return s.clamp(max=FP16_MAX).half().float()

    def _codes(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        _, thresholds = self.levels.on(w.device)
        inv = torch.where(s > 0, 1.0 / s.clamp_min(1e-30), torch.zeros_like(s))
        return _nearest(w * inv[..., None], thresholds)

    def quantize(self, w, params, col=0):
        levels, _ = self.levels.on(w.device)
        codes = self._codes(w.float(), params)
        return Quantized(levels[codes] * params[:, None], codes)

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        scale = torch.stack(params, 1)                                       # [rows, groups]
        return Packed(self.name, self.config(), (rows, cols),
                      {"codes": pack_bits(codes, self.bits), "scale": scale.half()})

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        scale = packed.data["scale"].float()
        levels, _ = self.levels.on(scale.device)
        codes = unpack_bits(packed.data["codes"], self.bits, rows * cols).reshape(rows, cols // g, g)
        return (levels[codes.to(scale.device)] * scale[..., None]).reshape(rows, cols)
