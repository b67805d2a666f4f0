"""Q3_K: super-blocks of 256 = 16 sub-blocks of 16 (110 bytes, 3.4375 bits per weight).

Layout: hmask[32], qs[64], scales[12], fp16 d. Code q (0..7) of weight k: low 2 bits in qs (as
Q2_K), high bit = bit k//32 of hmask[k%32]. Sub-block scale s_j (6 bits, stored +32): low nibble in
scales[j % 8] (j < 8 low half, else high half), top 2 bits in scales[8 + j%4] at bits 2*(j//4).
Value: (d * (s_j - 32)) * (q - 4).

quantize_row_q3_K_ref (no imatrix): per sub-block make_q3_quants(nmax 4, x^2 weights, coordinate
descent); the scale with largest |scale| sets d = max_scale/-32, s_j = nearest_int(-32*scale_j/max_scale).
quantize_row_q3_K_impl (imatrix qw): weights qw_j*sqrt(sigma2 + x_j^2), sigma2 = 2*sum(x^2)/256;
make_qx_quants(nmax 4) per sub-block, then make_qx_quants(nmax 32) over the 16 scales weighted by
the sub-block weight sums. Both re-round with the stored values: q = clamp(nearest_int(x/(d*s)), -4, 3) + 4.
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import (
    BlockCodec, BlockFit, bytes_fp16, fp16_bytes, per_weight,
)
from quantatlas.quant.codecs.ggml.cfloat import c_absmax, fdiv, nearest_int, seq_sum, sqrtf, to_fp16
from quantatlas.quant.codecs.ggml.q2_k import QK_K, pack_2bit, unpack_2bit
from quantatlas.quant.codecs.ggml.search import make_q3_quants, make_qx_quants



def int8(v: torch.Tensor) -> torch.Tensor:
    """A C cast to int8_t (wraps)."""
    return ((v + 128) & 0xFF) - 128


def pack_scales(s: torch.Tensor) -> torch.Tensor:
    """[B, 16] 6-bit values -> [B, 12] bytes."""
    low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    top = ((s >> 4) & 3).reshape(-1, 4, 4)  # [B, j//4, j%4]
    high = (top << torch.arange(0, 8, 2, dtype=torch.int32, device=s.device)[:, None]).sum(1)
    return torch.cat([low, high], 1).to(torch.uint8)


def unpack_scales(b: torch.Tensor) -> torch.Tensor:
    """[B, 12] bytes -> [B, 16] signed sub-block scales (s - 32)."""
    b = b.to(torch.int32)
    low = torch.cat([b[:, :8] & 0xF, b[:, :8] >> 4], 1)
    high = ((b[:, None, 8:12] >> torch.arange(0, 8, 2, dtype=torch.int32, device=b.device)[:, None]) & 3).reshape(-1, 16)
    return (low | (high << 4)) - 32


class Q3_K(BlockCodec):
    name = "q3_k"
    group_size = QK_K
    type_size = 110

    def fit_blocks(self, x, qw, sigma2):
        B = x.shape[0]
        xs = x.reshape(B * 16, 16)
        if qw is None:
            scales, L = make_q3_quants(xs, 4)
            scales = scales.reshape(B, 16)
            _, max_scale = c_absmax(scales)
            has = max_scale != 0
            iscale = fdiv(-32.0, max_scale)
            s = int8(nearest_int(iscale[:, None] * scales)).clamp(-32, 31) + 32
            s = torch.where(has[:, None], s, torch.zeros_like(s))
            d = torch.where(has, fdiv(1.0, iscale), torch.zeros_like(iscale))
        else:
            sigma2 = fdiv(2 * seq_sum(x * x), float(QK_K))
            weights = (qw * sqrtf(sigma2[:, None] + x * x)).reshape(B * 16, 16)
            sw = seq_sum(weights).reshape(B, 16)
            scales, L, _, _ = make_qx_quants(xs, 4, weights)
            d, s, _, _ = make_qx_quants(scales.reshape(B, 16), 32, sw)
        fields = self.with_grid({"scales": pack_scales(s), "d": to_fp16(d)})
        fit = BlockFit(fields, L.reshape(B, QK_K), {})
        fit.codes = self.rule_codes(x, fit, 0)
        return fit

    @staticmethod
    def with_grid(fields):
        """Add each sub-block's step d*(s - 32)."""
        return {**fields, "step": fields["d"].float()[:, None] * unpack_scales(fields["scales"]).float()}

    def _step(self, fields, col, c):
        return per_weight(fields["step"], QK_K, col, c)

    def rule_codes(self, x, fit, col):
        step = self._step(fit.fields, col, x.shape[1])
        q = nearest_int(x / step).clamp(-4, 3) + 4
        return torch.where(step != 0, q, fit.codes[:, col:col + x.shape[1]])

    def values(self, codes, fields, col):
        return self._step(fields, col, codes.shape[1]) * (codes - 4).float()

    def to_bytes(self, codes, fields):
        high = (codes > 3).to(torch.int32).reshape(-1, 8, 32)
        hmask = (high << torch.arange(8, dtype=torch.int32, device=codes.device)[:, None]).sum(1).to(torch.uint8)
        return torch.cat([hmask, pack_2bit(codes), fields["scales"], fp16_bytes(fields["d"])], 1)

    def from_bytes(self, blocks):
        hm = blocks[:, :32].to(torch.int32)
        high = ((hm[:, None, :] >> torch.arange(8, dtype=torch.int32, device=hm.device)[:, None]) & 1).reshape(-1, QK_K)
        codes = unpack_2bit(blocks[:, 32:96]) | (high << 2)
        return codes, self.with_grid({"scales": blocks[:, 96:108], "d": bytes_fp16(blocks[:, 108:110])})
