"""Q2_K: super-blocks of 256 = 16 sub-blocks of 16 (84 bytes, 2.625 bits per weight).

Layout: scales[16] (sub-block j: low nibble = scale code, high nibble = min code), qs[64],
fp16 d, fp16 dmin. Value of code q (0..3) in sub-block j: (d*sc_j)*q - (dmin*m_j).
qs: byte 32h + l holds weights 128h + l + 32k in bits 2k..2k+1 (k = 0..3).

quantize_row_q2_K_ref (no imatrix): per sub-block make_qkx2_quants(nmax 3, weights |x|,
rmin -0.5, rdelta 0.1, nstep 15, mean absolute error); sub-block scales and mins coded with
4 bits against their maxima (d = max_scale/15, dmin = max_min/15).
quantize_row_q2_K_impl (imatrix qw): weights qw_j*sqrt(sigma2 + x_j^2), sigma2 = sum(x^2)/256 of
the super-block; make_qkx3_quants(nmax 3, rmin -0.9, rdelta 0.05, nstep 36); scales and mins
coded by make_qp_quants(nmax 15) weighted by the sub-block weight sums.
Both then re-round every weight with the stored fp16 d, dmin and 4-bit codes:
q = clamp(nearest_int((x + dmin*m)/(d*sc)), 0, 3) (sub-blocks with d*sc = 0 keep the search codes).
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import (
    BlockCodec, BlockFit, bytes_fp16, fp16_bytes, per_weight,
)
from quantatlas.quant.codecs.ggml.cfloat import fdiv, nearest_int, seq_sum, sqrtf, to_fp16
from quantatlas.quant.codecs.ggml.search import make_qkx2_quants, make_qkx3_quants, make_qp_quants

QK_K = 256


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """[B, 256] codes (low 2 bits used) -> [B, 64] bytes in ggml's order."""
    c = (codes & 3).reshape(-1, 2, 4, 32)
    return (c << torch.arange(0, 8, 2, dtype=torch.int32, device=c.device)[:, None]).sum(2).reshape(-1, 64).to(torch.uint8)


def unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """[B, 64] bytes -> [B, 256] 2-bit codes."""
    q = qs.to(torch.int32).reshape(-1, 2, 1, 32)
    return ((q >> torch.arange(0, 8, 2, dtype=torch.int32, device=q.device)[:, None]) & 3).reshape(-1, QK_K)


def requantize_affine(x, codes, step, offset, nmax):
    """ggml's last pass: q = clamp(nearest_int((x + offset)/step), 0, nmax) where step != 0."""
    q = nearest_int((x + offset) / step).clamp(0, nmax)
    return torch.where(step != 0, q, codes)


def positive_max(t: torch.Tensor) -> torch.Tensor:
    """max = 0; if (t[j] > max) max = t[j];"""
    m = t.amax(-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


class Q2_K(BlockCodec):
    name = "q2_k"
    group_size = QK_K
    type_size = 84

    def fit_blocks(self, x, qw, sigma2):
        B = x.shape[0]
        xs = x.reshape(B * 16, 16)
        if qw is None:
            scales, mins, L = make_qkx2_quants(xs, 3, xs.abs(), -0.5, 0.1, 15, True)
            scales, mins = scales.reshape(B, 16), mins.reshape(B, 16)
            max_scale, max_min = positive_max(scales), positive_max(mins)
            has_scale, has_min = (max_scale > 0)[:, None], (max_min > 0)[:, None]
            ls = torch.where(has_scale, nearest_int(fdiv(15.0, max_scale)[:, None] * scales), 0)
            lm = torch.where(has_min, nearest_int(fdiv(15.0, max_min)[:, None] * mins), 0)
            d = torch.where(max_scale > 0, fdiv(max_scale, 15.0), torch.zeros_like(max_scale))
            dmin = torch.where(max_min > 0, fdiv(max_min, 15.0), torch.zeros_like(max_min))
        else:
            sigma2 = fdiv(seq_sum(x * x), float(QK_K))
            weights = (qw * sqrtf(sigma2[:, None] + x * x)).reshape(B * 16, 16)
            sw = seq_sum(weights).reshape(B, 16)
            scales, mins, L, *_ = make_qkx3_quants(xs, 3, weights, -0.9, 0.05, 36, False)
            d, ls = make_qp_quants(scales.reshape(B, 16), 15, sw)
            dmin, lm = make_qp_quants(mins.reshape(B, 16), 15, sw)
        fields = self.with_grid({"scales": ((ls & 0xFF) | (lm << 4) & 0xFF).to(torch.uint8),
                                 "d": to_fp16(d), "dmin": to_fp16(dmin)})
        fit = BlockFit(fields, L.reshape(B, QK_K), {})
        fit.codes = self.rule_codes(x, fit, 0)
        return fit

    @staticmethod
    def with_grid(fields):
        """Add each sub-block's step d*sc and offset dmin*m (as dequantize_row_q2_K forms them)."""
        sc = fields["scales"].to(torch.int32)
        return {**fields, "step": fields["d"].float()[:, None] * (sc & 0xF).float(),
                "offset": fields["dmin"].float()[:, None] * (sc >> 4).float()}

    def _grid(self, fields, col, c):
        return per_weight(fields["step"], QK_K, col, c), per_weight(fields["offset"], QK_K, col, c)

    def rule_codes(self, x, fit, col):
        step, offset = self._grid(fit.fields, col, x.shape[1])
        return requantize_affine(x, fit.codes[:, col:col + x.shape[1]], step, offset, 3)

    def values(self, codes, fields, col):
        step, offset = self._grid(fields, col, codes.shape[1])
        return step * codes.float() - offset

    def to_bytes(self, codes, fields):
        return torch.cat([fields["scales"], pack_2bit(codes), fp16_bytes(fields["d"]),
                          fp16_bytes(fields["dmin"])], 1)

    def from_bytes(self, blocks):
        fields = {"scales": blocks[:, :16], "d": bytes_fp16(blocks[:, 80:82]), "dmin": bytes_fp16(blocks[:, 82:84])}
        return unpack_2bit(blocks[:, 16:80]), self.with_grid(fields)
