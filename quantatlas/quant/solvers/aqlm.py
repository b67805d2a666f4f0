"""The AQLM solver: additive codebooks tuned against the layer output error (Egiazarian et al. 2024).

For a linear layer with calibration Hessian H = (2/N) X Xᵀ the target is
    L(C, s, codes) = tr((Ŵ − W) H (Ŵ − W)ᵀ) = (2/N) ‖(Ŵ − W) X‖²,   Ŵ_r = s_r · Σ_m C_m[codes].
It alternates (`rounds` times):
    codes  beam search of every g-column tile with the codebooks fixed, inside GPTQ's LDLQ loop
           (the codec's `quantize`; each tile's error feeds back into the later columns), and
    Adam   `adam_steps` steps on the codebooks and row scales with the codes fixed, on
           L / tr(W H Wᵀ); a step's result is kept only if L, with codebooks and scales rounded
           to what is stored, went down.
and ends with one more beam search under the final (stored) codebooks. The packed codes are the
last search's, unless the codes before it score lower under the same codebooks (the search
weighs columns by diag H only), in which case those are kept.
The codec's `fit` (residual k-means under diag H) gives the start. Needs the codec `aqlm`.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from quantatlas._lazy import torch
from quantatlas.quant.config import SolverConfig
from quantatlas.quant.solvers.base import Solver


class AQLMSolverConfig(SolverConfig):
    name = "aqlm"
    seeded = True   # the calibration draw follows the seed
    only_codec: ClassVar[str] = "aqlm"   # every codec this solver is handed must be AQLM (spec.Arm checks)
    rounds: int = Field(2, ge=0, le=100)            # (beam search, Adam) alternations
    adam_steps: int = Field(100, ge=0, le=100000)
    lr: float = Field(1e-2, gt=0, le=1.0, allow_inf_nan=False)
    block_size: int = Field(128, gt=0)
    damp: float = Field(0.01, ge=0, allow_inf_nan=False)

    def build(self):
        return AQLMSolver(self)


class AQLMSolver(Solver):
    name = "aqlm"
    needs = frozenset({"hessian"})

    def solve(self, W, stats, codec):
        W_hat, packed, _info = aqlm(W, stats["hessian"], codec, **self.cfg.model_dump())
        return W_hat, packed


class _Fixed:
    """The codec with its parameters fixed, for GPTQ's loop (fit returns them)."""

    def __init__(self, codec, params):
        self.codec, self.params = codec, params
        self.name, self.block_width, self.group_size = codec.name, codec.block_width, codec.group_size

    def group_of(self, cols):
        return self.codec.group_of(cols)

    def for_matrix(self, w):
        return self   # its parameters are fixed already

    def fit(self, w, importance=None):
        return self.params

    def quantize(self, w, params, col=0):
        return self.codec.quantize(w, params, col)

    def pack(self, codes, params):
        return self.codec.pack(codes, params)


def output_loss(codec, codes, books, scale, W, H) -> torch.Tensor:
    D = codec.values(codes, books, scale) - W
    return ((D @ H) * D).sum()


def aqlm(W: torch.Tensor, H: torch.Tensor, codec, *, rounds: int = 2, adam_steps: int = 100, lr: float = 1e-2,
         block_size: int = 128, damp: float = 0.01):
    """(Ŵ = decode(Packed), Packed, info with the proxy loss after each phase)."""
    from quantatlas.quant.codecs.aqlm import AQLM
    from quantatlas.quant.solvers.gptq import gptq

    if not isinstance(codec, AQLM):
        raise ValueError(f"solver aqlm needs the codec aqlm, got {codec.name!r}")
    W = W.detach().float()
    H = H.detach().float().to(W.device)
    params = codec.fit(W, torch.diagonal(H))
    codes, losses = None, []

    def search(p):
        _, packed, _ = gptq(W, H, _Fixed(codec, p), block_size=block_size - block_size % codec.block_width
                            or codec.block_width, damp=damp)
        n = W.shape[0] * W.shape[1] // codec.g * codec.m
        from quantatlas.quant.codecs.gptvq import unpack_wide
        return unpack_wide(packed.data, codec.b, n).reshape(W.shape[0], -1).to(W.device)

    def loss(p, c):
        with torch.no_grad():
            return float(output_loss(codec, c, p.codebooks.to(W.device), p.scale.to(W.device), W, H))

    for r in range(rounds + 1):
        found = search(params)
        losses.append(("beam", loss(params, found)))
        # a search under diag-H weights inside LDLQ may lose to the codes the codebooks were tuned for
        if codes is None or losses[-1][1] <= loss(params, codes):
            codes = found
        if r == rounds or not adam_steps:
            break
        params = _adam(codec, params, codes, W, H, adam_steps, lr, loss(params, codes))
        losses.append(("adam", loss(params, codes)))
    packed = codec.pack(codes.cpu(), [params])
    W_hat = codec.decode(packed).to(W.device)
    return W_hat, packed, {"losses": losses, "proxy_loss": loss(params, codes)}


def _adam(codec, params, codes, W, H, steps, lr, start_loss):
    norm = float(((W @ H) * W).sum()) or 1.0
    books = params.codebooks.clone().to(W.device).requires_grad_(True)
    scale = params.scale.clone().to(W.device).requires_grad_(bool(codec.cfg.scales))
    opt = torch.optim.Adam([books, scale] if codec.cfg.scales else [books], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = output_loss(codec, codes, books, scale, W, H) / norm
            loss.backward()
            opt.step()
    new = codec.make_params(books.detach(), scale.detach(), params.h)
    with torch.no_grad():
        after = float(output_loss(codec, codes, new.codebooks.to(W.device), new.scale.to(W.device), W, H))
    return new if after < start_loss else params
