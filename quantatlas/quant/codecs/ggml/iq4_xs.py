"""IQ4_XS: super-blocks of 256 = 8 blocks of 32 on the IQ4_NL grid (136 bytes, 4.25 bits per weight).

Layout: fp16 d, scales_h (uint16: bits 2j..2j+1 = top 2 bits of block j's 6-bit scale),
scales_l[4] (block j's low 4 bits in the low nibble of byte j//2 for even j, high for odd),
qs[128] (block j: bytes 16j.., code l | code l+16 << 4). Value: (d * (s_j - 32)) * KVALUES[q].

quantize_iq4_xs (with or without imatrix; ntry 7): the IQ4_NL scale search per block of 32 with
sigma2 = 2*sum(x^2)/256 over the super-block; d = max_scale/-32 (max_scale: the block scale of
largest magnitude), s_j = clamp(nearest_int(scale_j/d), -32, 31); codes re-chosen with 1/(d*s_j)
using the fp32 d.
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import BlockFit, bytes_fp16, fp16_bytes, nibbles
from quantatlas.quant.codecs.ggml.cfloat import c_absmax, fdiv, nearest_int, to_fp16
from quantatlas.quant.codecs.ggml.iq4_nl import IQ4_NL, iq4_block_scales, iq4_weights

QK_K = 256


class IQ4_XS(IQ4_NL):
    name = "iq4_xs"
    group_size = QK_K
    type_size = 136

    def fit_blocks(self, x, qw, sigma2):
        B = x.shape[0]
        weights = iq4_weights(x, qw).reshape(B * 8, 32)
        scales = iq4_block_scales(x.reshape(B * 8, 32), weights).reshape(B, 8)
        _, max_scale = c_absmax(scales)
        d = fdiv(-max_scale, 32.0)
        inv_d = torch.where(d != 0, fdiv(1.0, d), torch.zeros_like(d))
        s = nearest_int(inv_d[:, None] * scales).clamp(-32, 31)
        dl = d[:, None] * s.float()
        inv_dl = torch.where(dl != 0, fdiv(1.0, dl), torch.zeros_like(dl))
        fit = BlockFit(self.with_grid({"d": to_fp16(d), "scales": (s + 32).to(torch.uint8)}), None, {"id": inv_dl})
        fit.codes = self.rule_codes(x, fit, 0)
        return fit

    def _step(self, fields):  # d*(s - 32) per block of 32, kept with the fields
        return fields["step"]

    @staticmethod
    def with_grid(fields):
        return {**fields, "step": fields["d"].float()[:, None] * (fields["scales"].to(torch.int32) - 32).float()}

    def to_bytes(self, codes, fields):
        s = fields["scales"].to(torch.int32)
        scales_h = ((s >> 4) << torch.arange(0, 16, 2, dtype=torch.int32, device=s.device)).sum(1)
        scales_h = torch.stack([scales_h & 0xFF, scales_h >> 8], 1).to(torch.uint8)
        scales_l = nibbles(s[:, 0::2], s[:, 1::2])
        c = codes.reshape(-1, 8, 2, 16)
        qs = nibbles(c[:, :, 0], c[:, :, 1]).reshape(-1, 128)
        return torch.cat([fp16_bytes(fields["d"]), scales_h, scales_l, qs], 1)

    def from_bytes(self, blocks):
        b = blocks.to(torch.int32)
        scales_h = b[:, 2] | (b[:, 3] << 8)
        high = (scales_h[:, None] >> torch.arange(0, 16, 2, dtype=torch.int32, device=b.device)) & 3
        low = torch.stack([b[:, 4:8] & 0xF, b[:, 4:8] >> 4], 2).reshape(-1, 8)
        q = b[:, 8:136].reshape(-1, 8, 1, 16)
        codes = torch.cat([q & 0xF, q >> 4], 2).reshape(-1, QK_K)
        return codes, self.with_grid({"d": bytes_fp16(blocks[:, :2]), "scales": (low | (high << 4)).to(torch.uint8)})
