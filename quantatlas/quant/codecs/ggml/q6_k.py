"""Q6_K: super-blocks of 256 = 16 sub-blocks of 16 (210 bytes, 6.5625 bits per weight).

Layout: ql[128], qh[64], scales[16] (int8), fp16 d. For half h (weights 128h ..) and l < 32,
codes c_k = code of weight 128h + 32k + l: ql[64h + l] = c_0 low | c_2 low << 4,
ql[64h + 32 + l] = c_1 low | c_3 low << 4, qh[32h + l] = sum_k (c_k >> 4) << 2k.
Value of code q (0..63) in sub-block j: (d * s_j) * (q - 32).

quantize_row_q6_K_ref / _impl: per sub-block make_qx_quants(nmax 32) with weights x^2, or with the
imatrix qw as is (no sigma2 term); the scale of largest magnitude sets d = max_scale/-128,
s_j = min(127, nearest_int(-128*scale_j/max_scale)); a super-block whose scales are all below
GROUP_MAX_EPS is stored as zeros. Then q = clamp(nearest_int(x/(d*s_j)), -32, 31) + 32 where d*s_j != 0.
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import (
    BlockCodec, BlockFit, bytes_fp16, fp16_bytes, nibbles, per_weight,
)
from quantatlas.quant.codecs.ggml.cfloat import GROUP_MAX_EPS, c_absmax, fdiv, nearest_int, to_fp16
from quantatlas.quant.codecs.ggml.q2_k import QK_K
from quantatlas.quant.codecs.ggml.q3_k import int8
from quantatlas.quant.codecs.ggml.search import make_qx_quants



class Q6_K(BlockCodec):
    name = "q6_k"
    group_size = QK_K
    type_size = 210

    def fit_blocks(self, x, qw, sigma2):
        B = x.shape[0]
        xs = x.reshape(B * 16, 16)
        weights = xs * xs if qw is None else qw.reshape(B * 16, 16)
        scales, L, _, _ = make_qx_quants(xs, 32, weights)
        scales = scales.reshape(B, 16)
        max_abs, max_scale = c_absmax(scales)
        live = max_abs >= GROUP_MAX_EPS
        iscale = fdiv(-128.0, max_scale)
        s = int8(nearest_int(iscale[:, None] * scales).clamp(max=127))
        s = torch.where(live[:, None], s, torch.zeros_like(s))
        d = torch.where(live, fdiv(1.0, iscale), torch.zeros_like(iscale))
        L = torch.where(live[:, None], L.reshape(B, QK_K), torch.zeros_like(L.reshape(B, QK_K)))
        fit = BlockFit(self.with_grid({"scales": s.to(torch.int8), "d": to_fp16(d)}), L, {})
        fit.codes = self.rule_codes(x, fit, 0)
        return fit

    @staticmethod
    def with_grid(fields):
        """Add each sub-block's step d*s."""
        return {**fields, "step": fields["d"].float()[:, None] * fields["scales"].float()}

    def _step(self, fields, col, c):
        return per_weight(fields["step"], QK_K, col, c)

    def rule_codes(self, x, fit, col):
        step = self._step(fit.fields, col, x.shape[1])
        q = nearest_int(x / step).clamp(-32, 31) + 32
        return torch.where(step != 0, q, fit.codes[:, col:col + x.shape[1]])

    def values(self, codes, fields, col):
        return self._step(fields, col, codes.shape[1]) * (codes - 32).float()

    def to_bytes(self, codes, fields):
        c = codes.reshape(-1, 2, 4, 32)  # [B, h, k, l]
        ql = torch.cat([nibbles(c[:, :, 0], c[:, :, 2]), nibbles(c[:, :, 1], c[:, :, 3])], 2).reshape(-1, 128)
        qh = (((c >> 4) & 3) << torch.arange(0, 8, 2, dtype=torch.int32, device=c.device)[:, None]).sum(2).reshape(-1, 64).to(torch.uint8)
        return torch.cat([ql, qh, fields["scales"].view(torch.uint8), fp16_bytes(fields["d"])], 1)

    def from_bytes(self, blocks):
        ql = blocks[:, :128].to(torch.int32).reshape(-1, 2, 2, 32)    # [B, h, half of ql, l]
        low = torch.cat([ql & 0xF, ql >> 4], 2)                        # [B, h, k = 0, 1, 2, 3, l]
        qh = blocks[:, 128:192].to(torch.int32).reshape(-1, 2, 1, 32)
        high = (qh >> torch.arange(0, 8, 2, dtype=torch.int32, device=qh.device)[:, None]) & 3                # [B, h, k, l]
        codes = (low | (high << 4)).reshape(-1, QK_K)
        fields = {"scales": blocks[:, 192:208].contiguous().view(torch.int8), "d": bytes_fp16(blocks[:, 208:210])}
        return codes, self.with_grid(fields)
