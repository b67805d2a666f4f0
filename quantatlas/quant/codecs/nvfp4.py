"""NVFP4 (NVIDIA Blackwell's 4-bit float): E2M1 elements, one E4M3 scale per block of 16 weights of a row,
and one fp32 scale per tensor that brings the block scales into E4M3's range.

    nvfp4: {block: 16, scale_selection: max | four_over_six, tensor_scale: per_tensor | fused | per_row}

With A the tensor's largest magnitude, m a block's, and S = 448 (E4M3's max):

    t   = A / (6 · S)                                  fp32 tensor scale (A = 0: t = 1)
    s   = e4m3(clamp((m / 6) / t, 2^-6, 448))          the block's scale, rounded to E4M3 (ties to even)
    P   = e2m1(w · ((1 / t) / s))                      elements, saturated at ±6, ties to even
    w_hat = P · (t · s)

computed in fp32 in exactly this order: torchao 0.18's nvfp4_quantize (its per_tensor_scale is t =
amax / (448 · 6), per_tensor_amax_to_scale) and NVFP4Tensor.dequantize; the tests hold the two equal
bit for bit. (compressed-tensors stores the reciprocal, global_scale = 1 / t.)

scale_selection
    max            every block's largest magnitude maps to 6 (the rule above)
    four_over_six  "Four Over Six" (Cook et al. 2025, mit-han-lab/fouroversix): each block is also scaled so
                   that its largest magnitude maps to 4 (s4 = e4m3(clamp((m / 4) / t, ...)), where the grid
                   ±{.., 3, 4} has a finer top step than 4..6), and keeps whichever of the two gives the
                   smaller squared error over the block (6 on a tie). As in the authors' reference, t uses
                   S = 256 instead of 448 so that the max-to-4 scale, 1.5× the max-to-6 one, stays within
                   E4M3 (448 > 1.5 · 256).
tensor_scale
    per_tensor     A is the matrix's own amax (for activations / KV: each call's, unless `act: {static: true}`
                   fixes it from calibration)
    fused          A is shared by the modules vLLM fuses into one matrix (q/k/v, gate/up of a layer): the
                   weights step binds them to their joint amax (quant/fused.py), as llm-compressor writes
                   NVFP4 checkpoints; elsewhere (a lone matrix, activations) it is per_tensor
    per_row        one t per row (a token's activations, a head's K/V row; for weights, an output channel):
                   32 more bits per row

Stored parts (Packed.data): "codes" uint8, the E2M1 codes s|E|E|f two per byte (element 2i in the low nibble);
"scales" uint8 [rows, cols / 16], the E4M3 bytes of s (view as torch.float8_e4m3fn); "tensor_scale"
float32 [1] (per_row: [rows]), t itself. 4.5 bits per weight plus 32 bits per tensor (per row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.codecs.minifloat import E4M3, FP4
from quantatlas.quant.codecs.tensor_scale import TensorScaled
from quantatlas.quant.config import CodecConfig

#: the E4M3 scale a tensor's largest block maps to: 448 (E4M3's max); 256 under four_over_six
SCALE_MAX = {"max": 448.0, "four_over_six": 256.0}
#: the smallest block scale (E4M3's smallest normal, torch.finfo(float8_e4m3fn).tiny)
SCALE_MIN = 2.0 ** -6


class NVFP4Config(CodecConfig):
    name = "nvfp4"
    block: int = Field(16, gt=0, multiple_of=2)
    scale_selection: Literal["max", "four_over_six"] = "max"
    tensor_scale: Literal["per_tensor", "fused", "per_row"] = "per_tensor"

    @property
    def per_tensor_scale(self) -> bool:
        """Whether one scale serves a whole matrix (what `act: {static: true}` calibrates)."""
        return self.tensor_scale != "per_row"

    @property
    def tensor_scaled(self) -> bool:
        """A scale spans whole rows (quant/codecs/tensor_scale.py): the codec is handed rows whole."""
        return True

    def build(self):
        return NVFP4(self)


def tensor_scale_of(amax: torch.Tensor, selection: str) -> torch.Tensor:
    """t = A / (6 · S) in fp32 (1 where A = 0)."""
    t = amax.float() / (6.0 * SCALE_MAX[selection])
    return torch.where(t > 0, t, torch.ones_like(t))


def block_scale(m: torch.Tensor, t: torch.Tensor, target: float) -> torch.Tensor:
    """The E4M3 block scale s (as float32) mapping largest magnitudes m to `target` under tensor scale t."""
    return E4M3.round(torch.clamp((m / target) / t, SCALE_MIN, E4M3.max))


@dataclass
class NVFP4Params:
    scale: torch.Tensor        # [rows] float32 block scale s (an E4M3 value)
    dequant: torch.Tensor      # [rows] t · s
    reciprocal: torch.Tensor   # [rows] (1 / t) / s


def _params(s: torch.Tensor, t: torch.Tensor) -> NVFP4Params:
    return NVFP4Params(s, t * s, (1.0 / t) / s)


def _round(w: torch.Tensor, p: NVFP4Params) -> torch.Tensor:
    """E2M1 values of w (rows as p's), saturated at ±6."""
    return FP4.round(w.float() * p.reciprocal[:, None])


class NVFP4(TensorScaled, Codec):
    name = "nvfp4"

    def __init__(self, cfg: NVFP4Config):
        super().__init__(cfg)
        self.group_size = cfg.block
        self.selection = cfg.scale_selection
        self.per_row_amax = cfg.tensor_scale == "per_row"
        #: the weights step shares one amax among the modules a runtime fuses (quant/fused.py)
        self.shares_tensor_scale = cfg.tensor_scale == "fused"

    def tensor_scales(self, rows: int, device) -> torch.Tensor:
        """t per row [rows], from the bound amax."""
        return tensor_scale_of(self.bound_amax(rows, device), self.selection)

    def fit(self, w, importance=None):
        w = w.detach().float()
        t = self.tensor_scales(w.shape[0], w.device)
        return self._fit(w, t)

    def _fit(self, w, t):
        m = w.abs().amax(-1)
        six = _params(block_scale(m, t, 6.0), t)
        if self.selection == "max":
            return six
        four = _params(block_scale(m, t, 4.0), t)
        err6 = ((_round(w, six) * six.dequant[:, None] - w) ** 2).sum(-1)
        err4 = ((_round(w, four) * four.dequant[:, None] - w) ** 2).sum(-1)
        pick = err4 < err6
        return NVFP4Params(*(torch.where(pick, a, b) for a, b in ((four.scale, six.scale),
                                                                   (four.dequant, six.dequant),
                                                                   (four.reciprocal, six.reciprocal))))

    def quantize(self, w, params, col=0):
        q = _round(w, params)
        return Quantized(q * params.dequant[:, None], FP4.encode(q))

    def column_quantizer(self, params):
        """One GPTQ column with its block's scales: quantize's values and codes, bit for bit."""
        reciprocal, dequant = params.reciprocal, params.dequant

        def one_column(w, col, values, codes):
            q = FP4.round(w.float() * reciprocal)
            torch.mul(q, dequant, out=values)
            codes.copy_(FP4.encode(q))
        return one_column

    # every block of a matrix at once
    def _blocks(self, w):
        w = w.detach().float()
        rows, cols = w.shape
        g = self.group_of(cols)
        bound = self.for_matrix(w)
        t = bound.tensor_scales(rows, w.device).repeat_interleave(cols // g)
        blocks = w.reshape(-1, g)
        p = bound._fit(blocks, t)
        return bound, p, bound.quantize(blocks, p)

    def encode(self, w, importance=None):
        rows, cols = w.shape
        bound, p, q = self._blocks(w)
        return bound._pack(q.codes.reshape(rows, cols), p.scale.reshape(rows, -1))

    def fake_quantize(self, w, importance=None):
        return self._blocks(w)[2].values.reshape(w.shape)

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        return self._pack(codes, torch.stack([p.scale for p in params], 1))

    def _pack(self, codes, scales):
        rows, cols = codes.shape
        t = self.tensor_scales(rows, codes.device)
        return Packed(self.name, self.config(), (rows, cols),
                      {"codes": pack_bits(codes, 4), "scales": E4M3.encode(scales).to(torch.uint8).contiguous(),
                       "tensor_scale": (t if self.per_row_amax else t[:1]).float().contiguous()})

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        codes = unpack_bits(packed.data["codes"], 4, rows * cols).reshape(rows, cols)
        t = packed.data["tensor_scale"].float().reshape(-1, 1)
        dequant = t * E4M3.decode(packed.data["scales"])           # t · s, as the quantizer computed it
        return FP4.decode(codes) * dequant.repeat_interleave(g, 1)
