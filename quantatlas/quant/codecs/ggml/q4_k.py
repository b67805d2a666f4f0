"""Q4_K: super-blocks of 256 = 8 sub-blocks of 32 (144 bytes, 4.5 bits per weight).

Layout: fp16 d, fp16 dmin, scales[12] (eight 6-bit scale codes sc_j and min codes m_j, packed as
get_scale_min_k4 reads them), qs[128]: byte 32i + l holds weight 64i + l (low nibble) and 64i + 32 + l
(high nibble). Value of code q (0..15) in sub-block j: (d*sc_j)*q - (dmin*m_j).

quantize_row_q4_K_ref (no imatrix): per sub-block weights sqrt(mean x^2) + |x_j|,
make_qkx2_quants(nmax 15, rmin -1, rdelta 0.1, nstep 20); sc_j = nearest_int(63*scale_j/max_scale),
d = max_scale/63 (mins likewise).
quantize_row_q4_K_impl (imatrix qw): weights qw_j*sqrt(sigma2 + x_j^2), sigma2 = 2*sum(x^2)/256;
make_qkx3_quants(nmax 15, rmin -0.9, rdelta 0.05, nstep 36); scales and mins coded by
make_qp_quants(nmax 63) weighted by the sub-block weight sums.
Both re-round: q = clamp(nearest_int((x + dmin*m_j)/(d*sc_j)), 0, 15) where d*sc_j != 0.
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import (
    BlockCodec, BlockFit, bytes_fp16, fp16_bytes, nibbles, per_weight,
)
from quantatlas.quant.codecs.ggml.cfloat import fdiv, nearest_int, seq_sum, sqrtf, to_fp16
from quantatlas.quant.codecs.ggml.q2_k import QK_K, positive_max, requantize_affine
from quantatlas.quant.codecs.ggml.search import make_qkx2_quants, make_qkx3_quants, make_qp_quants


def pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """[B, 8] scale codes and min codes (C's uint8_t values) -> [B, 12] bytes."""
    b = torch.zeros(ls.shape[0], 12, dtype=torch.int32, device=ls.device)
    b[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    b[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return (b & 0xFF).to(torch.uint8)


def unpack_scales_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: [B, 12] bytes -> (sc [B, 8], m [B, 8])."""
    b = b.to(torch.int32)
    sc = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], 1)
    return sc, m


def six_bit_code(inv: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """uint8_t l = nearest_int(inv*v); l = MIN(63, l);"""
    return (nearest_int(inv[:, None] * v) & 0xFF).clamp(max=63)


class Q4_K(BlockCodec):
    name = "q4_k"
    group_size = QK_K
    type_size = 144
    nmax = 15
    ref_search = (-1.0, 0.1, 20)  # rmin, rdelta, nstep of the no-imatrix make_qkx2_quants
    cap_imatrix_codes = False      # quantize_row_q5_K_impl caps the qp codes at 63, q4_K's does not

    def fit_blocks(self, x, qw, sigma2):
        B = x.shape[0]
        xs = x.reshape(B * 8, 32)
        if qw is None:
            av_x = sqrtf(fdiv(seq_sum(xs * xs), 32.0))
            weights = av_x[:, None] + xs.abs()
            scales, mins, L = make_qkx2_quants(xs, self.nmax, weights, *self.ref_search, False)
            scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
            max_scale, max_min = positive_max(scales), positive_max(mins)
            inv_scale = torch.where(max_scale > 0, fdiv(63.0, max_scale), torch.zeros_like(max_scale))
            inv_min = torch.where(max_min > 0, fdiv(63.0, max_min), torch.zeros_like(max_min))
            ls, lm = six_bit_code(inv_scale, scales), six_bit_code(inv_min, mins)
            d, dmin = fdiv(max_scale, 63.0), fdiv(max_min, 63.0)
        else:
            sigma2 = fdiv(2 * seq_sum(x * x), float(QK_K))
            weights = (qw * sqrtf(sigma2[:, None] + x * x)).reshape(B * 8, 32)
            sw = seq_sum(weights).reshape(B, 8)
            scales, mins, L, *_ = make_qkx3_quants(xs, self.nmax, weights, -0.9, 0.05, 36, False)
            d, ls = make_qp_quants(scales.reshape(B, 8), 63, sw)
            dmin, lm = make_qp_quants(mins.reshape(B, 8), 63, sw)
            if self.cap_imatrix_codes:
                ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        fields = self.with_grid({"d": to_fp16(d), "dmin": to_fp16(dmin), "scales": pack_scales_k4(ls, lm)})
        fit = BlockFit(fields, L.reshape(B, QK_K), {})
        fit.codes = self.rule_codes(x, fit, 0)
        return fit

    @staticmethod
    def with_grid(fields):
        """Add each sub-block's step d*sc and offset dmin*m (as dequantize_row_q4_K forms them)."""
        sc, m = unpack_scales_k4(fields["scales"])
        return {**fields, "step": fields["d"].float()[:, None] * sc.float(),
                "offset": fields["dmin"].float()[:, None] * m.float()}

    def _grid(self, fields, col, c):
        return per_weight(fields["step"], QK_K, col, c), per_weight(fields["offset"], QK_K, col, c)

    def rule_codes(self, x, fit, col):
        step, offset = self._grid(fit.fields, col, x.shape[1])
        return requantize_affine(x, fit.codes[:, col:col + x.shape[1]], step, offset, self.nmax)

    def values(self, codes, fields, col):
        step, offset = self._grid(fields, col, codes.shape[1])
        return step * codes.float() - offset

    def to_bytes(self, codes, fields):
        c = codes.reshape(-1, 4, 2, 32)
        qs = nibbles(c[:, :, 0], c[:, :, 1]).reshape(-1, 128)
        return torch.cat([fp16_bytes(fields["d"]), fp16_bytes(fields["dmin"]), fields["scales"], qs], 1)

    def from_bytes(self, blocks):
        return self._low_nibbles(blocks[:, 16:144]), self._fields(blocks)

    @staticmethod
    def _low_nibbles(qs):
        q = qs.to(torch.int32).reshape(-1, 4, 1, 32)
        return torch.cat([q & 0xF, q >> 4], 2).reshape(-1, QK_K)

    @classmethod
    def _fields(cls, blocks):
        return cls.with_grid({"d": bytes_fp16(blocks[:, 0:2]), "dmin": bytes_fp16(blocks[:, 2:4]),
                              "scales": blocks[:, 4:16]})
