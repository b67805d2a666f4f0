"""IQ4_NL: blocks of 32 weights on a fixed non-uniform 16-level grid (18 bytes, 4.5 bits per weight).

Layout as Q4_0 (fp16 d, then byte j = code j | code j+16 << 4); value of code q: d * KVALUES[q].

quantize_iq4_nl (what llama-quantize runs, with or without imatrix; ntry = 7), i.e.
quantize_row_iq4_nl_impl: weights qw_j*sqrt(sigma2 + x_j^2) with sigma2 = 2*sum(x^2)/32, or x^2
without imatrix; start from d = max/127 (the x of largest |x| onto level -127), code each weight
with the nearest level (best_index_int8), refit d by weighted least squares, then try inverse scales
(itry - 127)/max for itry = -7..7 keeping the best; finally re-code with 1/d (fp32 d).
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import BlockFit, fp16_bytes, nibbles, per_weight
from quantatlas.quant.codecs.ggml.cfloat import (
    GROUP_MAX_EPS, best_index_int8, best_level, c_absmax, f32, fdiv, seq_sum, sqrtf, to_fp16,
)
from quantatlas.quant.codecs.ggml.q4_0 import Q4_0

KVALUES = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]  # kvalues_iq4nl


def level_values(codes: torch.Tensor) -> torch.Tensor:
    return torch.tensor(KVALUES, dtype=torch.float32, device=codes.device)[codes]


def iq4_block_scales(x: torch.Tensor, weights: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """The per-block scale search of quantize_row_iq4_nl_impl; x, weights [B, 32] -> d [B]."""
    amax, xmax = c_absmax(x)
    xt, wt = x.t().contiguous(), weights.t().contiguous()  # weights along dim 0: contiguous sums
    buf = xt.new_empty((3,) + xt.shape)

    def trial(inv):
        q = best_level(KVALUES, xt * inv)
        torch.mul(wt, q, out=buf[2])          # w*q
        torch.mul(buf[2], xt, out=buf[0])     # w*q*x
        torch.mul(buf[2], q, out=buf[1])      # w*q*q
        return seq_sum(buf[:2], dim=1)

    sumqx, sumq2 = trial(fdiv(1.0, fdiv(-xmax, float(KVALUES[0]))))
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = trial(fdiv(float(itry + KVALUES[0]), xmax))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(amax >= GROUP_MAX_EPS, d, torch.zeros_like(d))


def iq4_weights(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Weights of one super-block x [B, n]: qw*sqrt(sigma2 + x^2), sigma2 = sum(x^2) * (2/n); or x^2."""
    if qw is None:
        return x * x
    sigma2 = seq_sum(x * x) * f32(2.0 / x.shape[1])
    return qw * sqrtf(sigma2[:, None] + x * x)


class IQ4_NL(Q4_0):
    name = "iq4_nl"
    uses_row_sigma2 = False

    def fit_blocks(self, x, qw, sigma2):
        d = iq4_block_scales(x, iq4_weights(x, qw))
        inv_d = torch.where(d != 0, fdiv(1.0, d), torch.zeros_like(d))
        fit = BlockFit({"d": to_fp16(d)}, None, {"id": inv_d[:, None]})
        fit.codes = self.rule_codes(x, fit, 0)
        return fit

    def rule_codes(self, x, fit, col):
        return best_index_int8(KVALUES, per_weight(fit.rule["id"], self.group_size, col, x.shape[1]) * x)

    def values(self, codes, fields, col):
        step = per_weight(self._step(fields), self.group_size, col, codes.shape[1])
        return step * level_values(codes)

    def _step(self, fields):
        return fields["d"].float()[:, None]

    def to_bytes(self, codes, fields):
        return torch.cat([fp16_bytes(fields["d"]), nibbles(codes[:, :16], codes[:, 16:])], 1)
