"""Freeze-dry: a storage filter after a scalar codec (the parameter-golf report's idea). Weights that
a linear interpolation from their row neighbours predicts well enough are not stored; a bitmask says
which, and the loader rebuilds them from the neighbours.

For a matrix whose codec stores one `bits`-bit code per weight (uniform, lloyd_max, ...), with V the
decoded code values [rows, cols]:

    prediction    p_ij = a·V_i,j-1 + b·V_i,j+1        (interior columns only)
    (a, b)        least squares of V_ij on its two neighbours over the whole matrix, rounded to fp16
                  (stored: 4 bytes per matrix)
    candidate     |p_ij − V_ij| <= tol · RMS(V_i)      (the row's RMS: tol is relative, any scale fits)
    dropped       candidates whose two neighbours are both kept: in each run of consecutive
                  candidates along a row, its 1st, 3rd, 5th, ... (the most a path allows)

A dropped weight's code leaves the code stream; on load it becomes p_ij, computed from its two
neighbours, which are kept, hence exact code values: every rebuilt weight is within tol·RMS(V_i) of
its code value and every kept weight is its code value exactly. The filter is lossy by at most that.

Stored, replacing the codec's `codes`: the kept codes bit-packed in row-major order (`codes`), the
drop mask at 1 bit per weight (`freeze_mask`), the two fp16 coefficients (`freeze_coef`); the codec's
other parts (scales, zero points) unchanged. Bits per weight and artifact bytes are counted from
these parts, the mask included. In a file the pack is flagged by its config's `freeze_dry: tol`
(the tolerance is a record; decoding does not need it), and `FrozenPacked.from_parts` reads it back.

Where it sits: a pack wrapper (as incoherence's IncoherentPacked), applied by its own step after the
weights (and recovery, which moves scales, not codes), before the runtime steps
(quant/steps/freeze_dry.py). Incoherence packs (codes in a rotated basis) are refused; a norm's gain an
override quantizes (one vector, no row neighbours) is left as packed.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Packed, pack_bits, unpack_bits

#: the config key that marks a freeze-dried pack in a file (its value: the tolerance)
FLAG = "freeze_dry"
MASK_KEY, COEF_KEY, CODES_KEY = "freeze_mask", "freeze_coef", "codes"


class FreezeDryConfig(BaseModel):
    """`freeze_dry: {tol}`: drop the weights predicted within tol × their row's RMS."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    tol: float = Field(gt=0, le=1)


def scalar_codec_of(packed: Packed):
    """The codec of a pack that stores one `bits`-bit code per weight under `codes` (what freeze-dry can
    filter), or a ValueError saying why not."""
    from quantatlas.quant.config import build

    if FLAG in packed.config:
        raise ValueError("the pack is freeze-dried already")
    if packed.config.get("incoherence"):
        raise ValueError(f"{packed.codec} with incoherence stores codes of a rotated matrix; freeze-dry filters "
                         "plain codes only")
    codec = build("codec", {packed.codec: packed.config})
    bits = getattr(codec, "bits", None)
    rows, cols = packed.shape
    stream = packed.data.get(CODES_KEY)
    if codec.block_width != 1 or not isinstance(bits, int) or stream is None \
            or stream.numel() != (rows * cols * bits + 7) // 8 or stream.dtype != torch.uint8:
        raise ValueError(f"codec {packed.codec} does not store one code of its bits per weight under '{CODES_KEY}' "
                         "(freeze-dry filters scalar codecs: uniform, lloyd_max, ...)")
    return codec


def predictions(values: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """p = a·V[:, j-1] + b·V[:, j+1] for the interior columns j = 1 .. cols-2: [rows, cols - 2]."""
    a, b = coef.float().to(values.device)
    return a * values[:, :-2] + b * values[:, 2:]


def fit_coefficients(values: torch.Tensor) -> torch.Tensor:
    """(a, b) minimising Σ (V_ij − a V_i,j-1 − b V_i,j+1)² over the interior, rounded to fp16."""
    left, mid, right = (values[:, :-2].double().flatten(), values[:, 1:-1].double().flatten(),
                        values[:, 2:].double().flatten())
    gram = torch.stack([torch.stack([left @ left, left @ right]), torch.stack([left @ right, right @ right])])
    rhs = torch.stack([left @ mid, right @ mid])
    if float(torch.linalg.det(gram)) <= 1e-30 * float(gram.diagonal().sum()) ** 2:
        coef = torch.zeros(2, dtype=torch.float64)     # neighbours carry nothing (e.g. all-zero matrix)
    else:
        coef = torch.linalg.solve(gram, rhs)
    return coef.clamp(-65504, 65504).half().cpu()


def row_tolerance(values: torch.Tensor, tol: float) -> torch.Tensor:
    """tol × RMS of each row of the code values: [rows, 1]."""
    return tol * values.float().pow(2).mean(1, keepdim=True).sqrt()


def drop_mask(values: torch.Tensor, coef: torch.Tensor, tol: float) -> torch.Tensor:
    """[rows, cols] bool: the weights freeze-dry drops (module docstring)."""
    rows, cols = values.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=values.device)
    if cols < 3:
        return mask
    cand = mask.clone()
    cand[:, 1:-1] = (predictions(values, coef) - values[:, 1:-1]).abs() <= row_tolerance(values, tol)
    # position of each candidate inside its run of consecutive candidates: j − (last non-candidate before j) − 1
    idx = torch.arange(cols, device=values.device).expand(rows, cols)
    last_non = torch.where(cand, torch.full_like(idx, -1), idx).cummax(dim=1).values
    return cand & ((idx - last_non - 1) % 2 == 0)


class FrozenPacked(Packed):
    """A scalar codec's pack (`inner`) less the codes of the dropped weights, with the mask and the
    predictor's coefficients: decodes to the code values, the dropped ones rebuilt."""

    def __init__(self, inner: Packed, mask: torch.Tensor, coef: torch.Tensor, tol: float):
        super().__init__(inner.codec, {**inner.config, FLAG: float(tol)}, inner.shape, inner.data)
        self.inner, self.mask, self.coef, self.tol = inner, mask.bool(), coef.half().cpu(), float(tol)
        bits = scalar_codec_of(inner).bits
        rows, cols = inner.shape
        codes = unpack_bits(inner.data[CODES_KEY], bits, rows * cols).reshape(rows, cols)
        self._kept = pack_bits(codes[~self.mask.to(codes.device)], bits)

    def parts(self) -> dict[str, torch.Tensor]:
        return {**{k: v for k, v in self.inner.parts().items() if k != CODES_KEY}, CODES_KEY: self._kept,
                MASK_KEY: pack_bits(self.mask.flatten().to(torch.int64), 1), COEF_KEY: self.coef}

    @classmethod
    def from_parts(cls, codec, config, shape, parts) -> "FrozenPacked":
        """The pack whose `parts()` and flagged config a file stores: the inner codes put back in place
        (a dropped weight's code slot holds 0; its value is rebuilt, never read from it)."""
        rows, cols = shape
        inner_config = {k: v for k, v in config.items() if k != FLAG}
        mask = unpack_bits(parts[MASK_KEY], 1, rows * cols).reshape(rows, cols).bool()
        from quantatlas.quant.config import build

        bits = build("codec", {codec: inner_config}).bits
        kept = unpack_bits(parts[CODES_KEY], bits, int((~mask).sum()))
        codes = torch.zeros(rows, cols, dtype=torch.int64, device=kept.device)
        codes[~mask.to(kept.device)] = kept
        inner_parts = {k: v for k, v in parts.items() if k not in (MASK_KEY, COEF_KEY)}
        inner_parts[CODES_KEY] = pack_bits(codes, bits)
        inner = Packed.from_parts(codec, inner_config, shape, inner_parts)
        return cls(inner, mask, parts[COEF_KEY].reshape(2), config[FLAG])

    def decode(self) -> torch.Tensor:
        return rebuild(self.inner.decode(), self.mask, self.coef)


def rebuild(values: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The code values with the dropped ones replaced by their neighbours' prediction."""
    out = values.clone()
    if values.shape[1] >= 3:
        inner = out[:, 1:-1]
        m = mask[:, 1:-1].to(values.device)
        inner[m] = predictions(values, coef)[m]
    return out


def freeze_dry(packed: Packed, tol: float) -> FrozenPacked:
    """Filter one scalar codec's pack at tolerance `tol` (a ValueError says why a pack cannot be)."""
    scalar_codec_of(packed)
    values = packed.decode().float()
    coef = fit_coefficients(values)
    return FrozenPacked(packed, drop_mask(values, coef, tol), coef, tol)
