"""Q8_K: llama.cpp's activation type for the k-quant (and IQ) dot products: super-blocks of 256
values, an fp32 d, 256 int8 codes and 16 int16 sums of 16 codes (292 bytes, 9.125 bits per value).

quantize_row_q8_K_ref (ggml-quants.c; the CPU backend's quantize_row_q8_K calls it on x86): max is
the first value of largest magnitude (signed), iscale = -127/max, q = min(127, nearest_int(iscale·x))
(round half to even), d = 1/iscale kept in fp32; a block of zeros stores d = 0 and zero codes.
Values: d·q. The bsums only speed up the dot products with the weights' mins; d·q is what they
multiply. Not a weight format (no GGUF file stores Q8_K), so it is not in the ggml formats table.
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import BlockCodec, BlockFit
from quantatlas.quant.codecs.ggml.cfloat import fdiv, nearest_int
from quantatlas.quant.config import CodecConfig

QK_K = 256


class Q8_K(BlockCodec):
    group_size = QK_K
    type_size = 4 + QK_K + 2 * (QK_K // 16)

    def fit_blocks(self, x, qw, sigma2):
        first = x.abs().argmax(-1)                      # argmax returns the first maximal index
        mx = x.gather(1, first[:, None])[:, 0]
        zero = mx == 0
        iscale = fdiv(-127.0, torch.where(zero, torch.ones_like(mx), mx))
        d = torch.where(zero, torch.zeros_like(mx), fdiv(1.0, iscale))
        fit = BlockFit({"d": d}, None, {"iscale": torch.where(zero, torch.zeros_like(iscale), iscale)})
        fit.codes = self.rule_codes(x, fit, 0)
        return fit

    def rule_codes(self, x, fit, col):
        return nearest_int(x * fit.rule["iscale"][:, None]).clamp(max=127)

    def values(self, codes, fields, col):
        return codes.float() * fields["d"].float()[:, None]

    def to_bytes(self, codes, fields):
        q = codes.to(torch.int8)
        bsums = codes.reshape(-1, QK_K // 16, 16).sum(-1).to(torch.int16)
        return torch.cat([fields["d"].float().contiguous().view(torch.uint8).reshape(-1, 4), q.view(torch.uint8),
                          bsums.contiguous().view(torch.uint8).reshape(-1, QK_K // 8)], 1)

    def from_bytes(self, blocks):
        d = blocks[:, :4].contiguous().view(torch.float32).reshape(-1)
        return blocks[:, 4:4 + QK_K].contiguous().view(torch.int8).to(torch.int32), {"d": d}


Q8_K.name, Q8_K.ggml_type = "q8_k", "Q8_K"   # set after the class: no entry in the weight formats


class Q8KConfig(CodecConfig):
    name = "q8_k"

    def build(self):
        return Q8_K(self)
