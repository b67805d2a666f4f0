"""MXFP4 as llama.cpp stores it (ggml type MXFP4, gpt-oss's weights): blocks of 32 weights, one E8M0 byte e then
16 bytes of E2M1 nibbles (17 bytes, 4.25 bits per weight). Byte j holds weight j (low nibble) and weight j+16.

Value of code q: d · kvalues_mxfp4[q], kvalues_mxfp4 = 2 × the E2M1 values (0, 1, 2, 3, 4, 6, 8, 12, then the
same negated), d = 2^(e - 128) (GGML_E8M0_TO_FP32_HALF: half the E8M0 scale, which the doubled table undoes).

quantize_row_mxfp4_ref (quantize_mxfp4 ignores an imatrix):
    e = floor(log2f(amax)) - 2 + 127 (0 for an all-zero block), the OCP `floor` rule;
    q = the first code of least |d · kvalues[q] - x| (fp32), scanning codes 0..15.
So it differs from an OCP MXFP4 cast with the `floor` rule (the `mx` codec, quant/codecs/mx.py) only in how
it breaks ties: an exact midpoint goes to the code listed first, the smaller magnitude (in E2M1 units 0.75 → 0.5,
1.75 → 1.5, 3.5 → 3; -0.25 → +0, code 0), where the OCP cast rounds ties to even (→ 1, 2, 4; -0). log2f is fp32: for an amax a few ulps below a power of two
it rounds to that power, and so does this codec (log2 in fp64, rounded to fp32, as numpy's float32 log2
computes it; the tests hold the bytes equal to the `gguf` package's quantize on random and heavy-tailed rows).
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import BlockCodec, BlockFit, nibbles

#: kvalues_mxfp4 (ggml-common.h): E2M1 values doubled, code order
KVALUES = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """GGML_E8M0_TO_FP32_HALF: 2^(e - 128) as float32."""
    return torch.ldexp(torch.ones(e.shape, device=e.device), e.to(torch.int64) - 128)


class MXFP4(BlockCodec):
    name = "mxfp4"
    group_size = 32
    type_size = 17

    def fit_blocks(self, x, qw, sigma2):
        amax = x.abs().amax(-1)
        log2 = torch.log2(amax.double()).float()   # log2f: the fp32 rounding of log2
        e = torch.where(amax > 0, torch.floor(log2) - 2 + 127, torch.zeros_like(amax))
        e = e.clamp(0, 255).to(torch.uint8)
        fit = BlockFit({"e": e}, None, {"d": e8m0_half(e)})
        fit.codes = self.rule_codes(x, fit, 0)
        return fit

    def rule_codes(self, x, fit, col):
        levels = torch.tensor(KVALUES, dtype=torch.float32, device=x.device)
        errs = (fit.rule["d"][:, None, None] * levels - x[..., None]).abs()    # [B, c, 16], fp32 as ggml
        return torch.argmin(errs, -1).to(torch.int32)                          # first least error

    def values(self, codes, fields, col):
        levels = torch.tensor(KVALUES, dtype=torch.float32, device=codes.device)
        return e8m0_half(fields["e"])[:, None] * levels[codes.long()]

    def to_bytes(self, codes, fields):
        return torch.cat([fields["e"].to(torch.uint8)[:, None], nibbles(codes[:, :16], codes[:, 16:])], 1)

    def from_bytes(self, blocks):
        qs = blocks[:, 1:17].to(torch.int32)
        return torch.cat([qs & 0xF, qs >> 4], 1), {"e": blocks[:, 0].contiguous()}
