"""PolarQuant (Han, Kacham, Karbasi, Mirrokni, Zandieh 2025, arXiv 2502.02617): a KV-cache code with
no per-block scale or zero point.

Per vector w ∈ R^d (one row of a group of d columns; in a KV cache a token's head, d = head_dim):

    y        = Π w                         Π a Haar-random orthogonal d×d matrix from `seed`
    ψ, r     = polar_transform(y, L)       angles of levels 1..L, the d/2^L last radii (quant/polar.py)
    k_l      = nearest level of ψ_l in the level-l Lloyd-Max codebook (bits[l] bits per angle)
    ŵ        = Πᵀ inverse_polar_transform(ψ̂, fp16(r))

Preconditioning: Π = QR of a seeded Gaussian matrix with the signs of R's diagonal moved into Q
(Haar measure). For any fixed w, Πw/‖w‖ is then uniform on the sphere, so every angle follows the
law quant/polar.py derives for Gaussian vectors (level 1 uniform on [0, 2π), level l ≥ 2 density
∝ sin^(2^(l-1)-1)(2ψ) on [0, π/2]), independently of w's own distribution. That is what lets a fixed
codebook per level stand in for a scale: the angles need no normalisation, and the size of w is
carried by the radii alone. (The paper's preconditioner is a random Gaussian sketch; a Haar rotation
gives the same angle laws and is exactly invertible.)

Options: `bits` is a list (bits of each level's angles, level 1 first; its length is L) or one
number for every level; `levels` (with a number) is L, by default log2 of the largest power of two
dividing d (the full recursion: one radius per vector). The paper's KV setting is
`bits: [4, 2, 2, 2]` (L = 4): d/2·4 + d/4·2 + d/8·2 + d/16·2 angle bits and d/16 fp16 radii,
3.875 bits per value for any d divisible by 16.

Stored per matrix: each level's codes bit-packed (`angles<l>`), the last radii in fp16 (`radius`,
as the paper stores them), and the 8-byte seed from which Π is rebuilt. Codebooks are functions of
(level, bits) and are not stored. Bits per value are therefore exactly

    (Σ_l d/2^l · bits_l + 16 · d/2^L) / d  +  64 / (rows · cols).

`importance` is not used. A block code: a solver hands it whole groups (block_width = group).
"""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from quantatlas._lazy import torch
from quantatlas.context import RunContext
from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.config import CodecConfig
from quantatlas.quant.polar import angle_codebook, inverse_polar_transform, polar_transform

FP16_MAX = 65504.0
MAX_LEVELS = 16


class PolarQuantConfig(CodecConfig):
    name = "polarquant"
    seeded = True
    bits: int | list[int]
    levels: int | None = Field(None, ge=1, le=MAX_LEVELS)
    group: int | None = Field(None, ge=2)          # null: one vector per row
    seed: int = Field(0, ge=0, lt=2 ** 63)

    @field_validator("bits")
    @classmethod
    def _bits(cls, b):
        values = b if isinstance(b, list) else [b]
        if not 1 <= len(values) <= MAX_LEVELS or any(not 1 <= v <= 8 for v in values):
            raise ValueError(f"bits per angle must be 1 to 8 (a list: one per level, 1 to {MAX_LEVELS} levels), got {b}")
        return b

    @model_validator(mode="after")
    def _levels_match(self):
        if isinstance(self.bits, list) and self.levels is not None and self.levels != len(self.bits):
            raise ValueError(f"levels: {self.levels} levels with bits for {len(self.bits)} (a bits list sets the "
                             "levels; leave levels out)")
        if self.group is not None and self.levels is not None and self.group % (1 << self.levels):
            raise ValueError(f"group: {self.levels} levels need a group divisible by {1 << self.levels}, got {self.group}")
        if self.group is not None and isinstance(self.bits, list) and self.group % (1 << len(self.bits)):
            raise ValueError(f"group: {len(self.bits)} levels need a group divisible by {1 << len(self.bits)}, "
                             f"got {self.group}")
        return self

    def build(self):
        return PolarQuant(self)


def haar_rotation(d: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal d×d matrix (float64, CPU) from `seed`: Q of the QR of a Gaussian
    matrix, its columns multiplied by the signs of R's diagonal (without that the law is not Haar)."""
    g = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(int(seed)))
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :]


def two_adic_levels(d: int) -> int:
    """log2 of the largest power of two dividing d (the full recursion's depth)."""
    return (d & -d).bit_length() - 1


class PolarQuant(Codec):
    name = "polarquant"

    def __init__(self, cfg: PolarQuantConfig):
        super().__init__(cfg)
        self.group_size, self.seed = cfg.group, cfg.seed
        self.block_width = cfg.group or 1
        self._rotations: dict = {}
        self._tables: dict = {}

    def for_run(self, ctx: RunContext) -> "PolarQuant":
        """Run seed s draws Π from `seed + s` (the "offset" derivation, as turbo's signs); the run codec's
        config holds it, so its packs decode on their own."""
        seed = ctx.sub_seed("offset", self.seed)
        return self if seed == self.seed else PolarQuant(self.cfg.model_copy(update={"seed": seed}))

    # -- layout ------------------------------------------------------------------------------
    def level_bits(self, d: int) -> list[int]:
        """Bits of each level's angles for vectors of length d (level 1 first)."""
        b = self.cfg.bits
        if isinstance(b, list):
            return list(b)
        return [b] * (self.cfg.levels or two_adic_levels(d))

    def group_of(self, cols: int) -> int:
        g = super().group_of(cols)
        L = len(self.level_bits(g))
        if L < 1 or g % (1 << L):
            raise ValueError(f"polarquant: {L} levels need vectors of a multiple of {1 << L} values, got {g}")
        return g

    def _rotation(self, d: int, device) -> torch.Tensor:
        key = (d, str(device))
        if key not in self._rotations:
            self._rotations[key] = haar_rotation(d, self.seed).float().to(device)
        return self._rotations[key]

    def _codebooks(self, d: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(levels, thresholds) of each level as float32 tensors on `device`."""
        key = (d, str(device))
        if key not in self._tables:
            self._tables[key] = [
                tuple(torch.tensor(a, dtype=torch.float32, device=device) for a in (cb.levels, cb.thresholds))
                for cb in (angle_codebook(level, bits) for level, bits in enumerate(self.level_bits(d), 1))]
        return self._tables[key]

    # -- the code ------------------------------------------------------------------------------
    def _angles_and_radii(self, w: torch.Tensor):
        d = w.shape[1]
        y = w.float() @ self._rotation(d, w.device).T            # each row: Π w
        return polar_transform(y, len(self.level_bits(d)))

    def _codes(self, angles: list[torch.Tensor], d: int) -> torch.Tensor:
        """[rows, d - d/2^L]: each level's codes, level 1 first."""
        out = []
        for psi, (_, thresholds) in zip(angles, self._codebooks(d, angles[0].device)):
            out.append(torch.bucketize(psi.contiguous(), thresholds))   # nearest level: cells cut at midpoints
        return torch.cat(out, dim=1)

    def _reconstruct(self, codes: torch.Tensor, radii: torch.Tensor, d: int) -> torch.Tensor:
        """Rows [rows, d] from their codes [rows, d - d/2^L] and last radii [rows, d/2^L]."""
        angles, at = [], 0
        for level, (levels, _) in enumerate(self._codebooks(d, codes.device), 1):
            n = d >> level
            angles.append(levels[codes[:, at:at + n]])
            at += n
        y = inverse_polar_transform(angles, radii.float())
        return y @ self._rotation(d, codes.device)                  # Πᵀ y, row by row

    def fit(self, w, importance=None):
        """The group's last radii, rounded to fp16 as stored: [rows, d/2^L] (the norms of the rotated
        vector's blocks of 2^L, taken pair by pair as the transform does; its angles are not needed)."""
        d = w.shape[1]
        r = w.float() @ self._rotation(d, w.device).T
        for _ in self.level_bits(d):
            r = torch.hypot(r[..., 0::2], r[..., 1::2])
        return r.clamp(max=FP16_MAX).half().float()

    def quantize(self, w, params, col=0):
        d = params.shape[1] << len(self.level_bits(w.shape[1]))
        if col != 0 or w.shape[1] != d:
            raise ValueError(f"polarquant quantizes whole vectors: got columns {col}..{col + w.shape[1]} of a "
                             f"vector of {d} (a solver must pass block_width = group columns)")
        angles, _ = self._angles_and_radii(w)
        codes = self._codes(angles, d)
        return Quantized(self._reconstruct(codes, params, d), codes)

    def pack(self, codes, params):
        rows, _ = codes.shape
        radii = torch.stack(params, 1)                               # [rows, groups, d/2^L]
        groups, n_r = radii.shape[1], radii.shape[2]
        d = codes.shape[1] // groups + n_r                           # each vector: d - d/2^L codes, d/2^L radii
        bits = self.level_bits(d)
        per = codes.reshape(rows, groups, d - n_r)
        data, at = {}, 0
        for level, b in enumerate(bits, 1):
            n = d >> level
            data[f"angles{level}"] = pack_bits(per[:, :, at:at + n].reshape(-1), b)
            at += n
        data["radius"] = radii.reshape(rows, groups * n_r).half()
        data["seed"] = torch.tensor([self.seed], dtype=torch.int64)
        return Packed(self.name, self.config(), (rows, groups * d), data)

    def decode(self, packed):
        rows, cols = packed.shape
        d = self.group_of(cols)
        if int(packed.data["seed"][0]) != self.seed:
            raise ValueError(f"polarquant: packed seed {int(packed.data['seed'][0])} differs from this codec's {self.seed}")
        groups, bits = cols // d, self.level_bits(d)
        radii = packed.data["radius"].float()
        parts = [unpack_bits(packed.data[f"angles{level}"], b, rows * groups * (d >> level))
                 .reshape(rows * groups, d >> level).to(radii.device) for level, b in enumerate(bits, 1)]
        n_r = d >> len(bits)
        w = self._reconstruct(torch.cat(parts, 1), radii.reshape(rows * groups, n_r), d)
        return w.reshape(rows, cols)
