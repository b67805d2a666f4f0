"""Q8_0: blocks of 32 weights, fp16 d then 32 int8 codes (34 bytes, 8.5 bits per weight).

quantize_row_q8_0_ref: d = max|x| / 127, q = roundf(x * (1/d)) (halves away from zero) with the
fp32 d, stored d = fp16(d); dequantize: q * d. ggml ignores an imatrix for Q8_0.
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import BlockCodec, BlockFit, bytes_fp16, fp16_bytes
from quantatlas.quant.codecs.ggml.cfloat import fdiv, roundf, to_fp16

QK8_0 = 32


class Q8_0(BlockCodec):
    name = "q8_0"
    group_size = QK8_0
    type_size = 34

    def fit_blocks(self, x, qw, sigma2):
        d = fdiv(x.abs().amax(-1), 127.0)
        inv_d = torch.where(d != 0, fdiv(1.0, d), torch.zeros_like(d))
        fit = BlockFit({"d": to_fp16(d)}, None, {"id": inv_d})
        fit.codes = self.rule_codes(x, fit, 0)
        return fit

    def rule_codes(self, x, fit, col):
        return roundf(x * fit.rule["id"][:, None]).clamp(-128, 127).to(torch.int32)

    def values(self, codes, fields, col):
        return codes.float() * fields["d"].float()[:, None]

    def to_bytes(self, codes, fields):
        return torch.cat([fp16_bytes(fields["d"]), codes.to(torch.int8).view(torch.uint8)], 1)

    def from_bytes(self, blocks):
        return blocks[:, 2:].contiguous().view(torch.int8).to(torch.int32), {"d": bytes_fp16(blocks[:, :2])}
