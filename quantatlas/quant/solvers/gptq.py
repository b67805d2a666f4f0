"""GPTQ with any codec inside: one weight matrix at a time, Hessian given.

Problem. For a linear layer y = W x with calibration inputs X [cols, N] and
H = (2/N) X Xᵀ, find Ŵ on the codec's grid minimising the proxy loss

    tr((Ŵ - W) H (Ŵ - W)ᵀ) = (2/N) ‖Ŵ X - W X‖²,   rows independent, sharing H.

GPTQ (Frantar et al. 2022, IST-DASLab reference structure). Columns are quantized one
at a time; after column q is fixed the still-free columns F absorb its error optimally
(OBS): w_F ← w_F - (w_q - q̂)/[H_F⁻¹]_qq · [H_F⁻¹]_{q,F}. With U the upper Cholesky factor
of H⁻¹ (H⁻¹ = UᵀU), row q of U already holds [H_F⁻¹]_{q,F}/√[H_F⁻¹]_qq for F = {q, q+1, ...},
so the update is w_F -= e_q U[q, F] with e_q = (w_q - q̂)/U_qq: no re-inversion. Updates
are lazy: inside a block of `block_size` columns they are applied at once to the block,
and to the columns after it by one matmul per block (E @ U[block, rest]).

Vector codecs (codec.block_width = bw > 1) quantize bw columns jointly. The OBS update for
a set B of columns fixed at once is W_F -= (W_B - Q_B) [H_F⁻¹]_BB⁻¹ [H_F⁻¹]_{B,F}, which
with the factor is W_F -= E U[B, F] where E = (W_B - Q_B) U_BB⁻¹ (LDLQ, Chee et al. 2023;
bw = 1 gives GPTQ back). block_size must be a multiple of bw.

Codec parameters. At each group boundary, params = codec.fit(current weights of the
group, importance) with importance = diag(H) of the group (`importance_from_hessian`),
then codec.quantize(bw columns, params, offset in group), which gives the grid values and
the codes; the codes are what `pack` stores (no second search). "Current" means with every
update so far applied, also to columns past the current lazy block, so the result does
not depend on block_size. (The reference fits on W as of the block's start, which can
differ when a group starts inside a block.) `static_groups` fits every group up front
on the original weights instead.

act_order: columns go in order of descending diag(H) (whole bw-column blocks by their
summed diag for vector codecs). Groups stay on the original column grid: for a codec
with more than one group per row act_order requires static_groups=True, so the stored
matrix needs no permutation or group index and decode(Packed) is Ŵ as it stands. (A
stored permutation would be honest in bits but could not travel into formats without
one, such as GGUF; per-row codecs need nothing either way.) Ŵ comes back in the
original column order.

Damping and dead columns as the reference: columns with diag(H) = 0 are zeroed in W and
get H_jj = 1; then damp · mean(diag H) is added to the diagonal. If a Cholesky fails,
damp is raised tenfold (with a warning each time) up to MAX_DAMP_RAISES times, then a
ValueError; the damp used is in the returned info.

GPTAQ (Li et al., ICML 2025, "GPTAQ: Efficient Finetuning-Free Quantization for
Asymmetric Calibration"). The target is the fp model's output W X̃ (X̃ = the fp model's
inputs) while the quantized layer sees X (the quantized model's inputs): minimise
‖W X̃ - Ŵ X‖². With H = (2/N) X Xᵀ from X and H_cross = (2/N) (X̃ - X) Xᵀ, the paper's
step-q update adds to GPTQ's the least-squares compensation of column q's asymmetry
term w_q ΔX_q by the free columns F' after q:

    w_F' += w_q · H_cross[q, F'] (H_F')⁻¹          (w_q: column q's value before rounding)

and, since U[F',F']ᵀ U[F',F'] = (H_F')⁻¹ for the suffix F', all these rows come at once
from P = ((H_cross Uᵀ) ⊙ M) U with M the strictly (block-)upper mask. The pre-rounding
values of each block are kept, so the lazy updates use the same w_q inside a block and
across blocks (the authors' code uses w_q inside a block but q̂ in the cross-block
matmul, which makes the result depend on the block size). `gptaq_alpha` scales P: the
paper has no such factor (alpha = 1, the default); the authors' code multiplies P by
0.25, an empirical choice (GPTAQ issue #4).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any

from pydantic import Field

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed
from quantatlas.quant.config import SolverConfig
from quantatlas.quant.solvers.base import Solver

#: how many times damp is multiplied by 10 before giving up on a Hessian
MAX_DAMP_RAISES = 4


class GPTQConfig(SolverConfig):
    name = "gptq"
    seeded = True   # the calibration draw follows the seed
    block_size: int = Field(128, gt=0)
    damp: float = Field(0.01, ge=0, allow_inf_nan=False)
    act_order: bool = False
    static_groups: bool = False
    importance_from_hessian: bool = True
    #: random-sign Hadamard on both sides of W and H ← V H Vᵀ (quant/incoherence.py), signs from the run seed
    incoherence: bool = False

    def build(self):
        return GPTQ(self)


class GPTAQConfig(GPTQConfig):
    name = "gptaq"
    gptaq_alpha: float = Field(1.0, allow_inf_nan=False)

    def build(self):
        return GPTQ(self)


class GPTQ(Solver):
    """GPTQ (and GPTAQ when the config is gptaq: the cross term joins the statistics)."""

    def __init__(self, cfg: GPTQConfig):
        super().__init__(cfg)
        self.name = cfg.name
        self.needs = frozenset({"hessian", "cross"} if cfg.name == "gptaq" else {"hessian"})

    def solve(self, W, stats, codec):
        opts = self.cfg.model_dump()
        cross = stats.get("cross") if "cross" in self.needs else None
        if not opts.pop("incoherence"):
            w_hat, packed, _info = gptq(W, stats["hessian"], codec, H_cross=cross, **opts)
            return w_hat, packed
        # incoherence processing: solve W' = U W Vᵀ against H' = V H Vᵀ, return Ŵ = Uᵀ Ŵ' V
        from quantatlas.quant.incoherence import Incoherence

        inc = Incoherence(*W.shape, self.next_tensor_seed())
        w_rot, packed, _info = gptq(inc.weight(W.double()), inc.hessian(stats["hessian"].double()), codec,
                                    H_cross=None if cross is None else inc.hessian(cross.double()), **opts)
        return inc.unweight(w_rot.double()).float(), inc.wrap(packed)


def gptq(W: torch.Tensor, H: torch.Tensor, codec: Codec, *, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False, static_groups: bool = False, importance_from_hessian: bool = True,
         H_cross: torch.Tensor | None = None, gptaq_alpha: float = 1.0) -> tuple[torch.Tensor, Packed, dict]:
    """Quantize W [rows, cols] with `codec` against H [cols, cols]; GPTAQ when H_cross is given.

    Returns (Ŵ float32 in the original column order, the codec's Packed with decode(Packed) == Ŵ,
    info: damp used, proxy_loss tr((Ŵ-W) H (Ŵ-W)ᵀ) with the undamped H, dead_columns, seconds,
    and with H_cross asym_proxy_loss = (2/N)(‖W X̃ - Ŵ X‖² - ‖W X̃ - W X‖²)).
    """
    t0 = time.perf_counter()
    rows, cols, bw, g = _check(W, H, codec, block_size, damp, act_order, static_groups, H_cross, gptaq_alpha)
    dev = W.device
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32  # fp32 unless given fp64
    W_orig = W.detach().to(dtype)
    H_orig = H.detach().to(dev, dtype)
    hdiag = torch.diagonal(H_orig)
    importance = hdiag if importance_from_hessian else None

    # dead inputs: nothing to preserve there; H_jj = 1 keeps H invertible
    dead = torch.nonzero(hdiag == 0).flatten()
    Wq = W_orig.clone()
    Wq[:, dead] = 0
    Hd = H_orig.clone()
    Hd[dead, dead] = 1
    C = None
    if H_cross is not None:
        C = H_cross.detach().to(dev, dtype).clone()
        C[:, dead] = 0

    # codec parameters per group; fitted up front (static) or at the group's first column
    n_groups = cols // g
    params: list[Any] = [None] * n_groups
    if static_groups or act_order:
        for gi in range(n_groups):
            params[gi] = codec.fit(Wq[:, gi * g:(gi + 1) * g], _slice(importance, gi * g, g))

    order = _act_order(torch.diagonal(Hd), bw) if act_order else None
    if order is not None:
        Wq, Hd = Wq[:, order], Hd[order][:, order]
        C = None if C is None else C[order][:, order]
    column_at = order.tolist() if order is not None else range(cols)  # original column of each position

    U, damp = _inverse_upper_factor(Hd, damp)
    del Hd
    P = None
    if C is not None:
        block_of = torch.arange(cols, device=dev) // bw
        later = block_of[None, :] > block_of[:, None]  # position k is free after position i's block is fixed
        P = gptaq_alpha * ((C @ U.T) * later) @ U
        del C, later

    Q = torch.empty_like(Wq)
    codes: list = [None] * (cols // bw)  # the codec's codes per bw-column block, in original column order
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wq[:, i1:i2].clone()   # this block; its columns keep their pre-rounding values (GPTAQ uses them)
        E1 = torch.zeros_like(W1)   # scaled errors (w - q̂) U_BB⁻¹, propagated lazily past the block
        for j in range(0, i2 - i1, bw):
            p = i1 + j
            gi, col = divmod(column_at[p], g)
            if params[gi] is None:  # no act_order here, so position == column
                cur = _current(Wq, W1, E1, U, P, i1, i2, j, p, p + g)
                params[gi] = codec.fit(cur, _slice(importance, p, g))
            w = W1[:, j:j + bw]
            quantized = codec.quantize(w, params[gi], col)
            codes[column_at[p] // bw] = quantized.codes
            q = quantized.values.to(dtype)
            Q[:, p:p + bw] = q
            if bw == 1:
                e = (w - q) / U[p, p]
            else:
                e = torch.linalg.solve_triangular(U[p:p + bw, p:p + bw], w - q, upper=True, left=False)
            E1[:, j:j + bw] = e
            W1[:, j + bw:].addmm_(e, U[p:p + bw, p + bw:i2], alpha=-1)
            if P is not None:
                W1[:, j + bw:].addmm_(w, P[p:p + bw, p + bw:i2])
        if i2 < cols:
            Wq[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)
            if P is not None:
                Wq[:, i2:].addmm_(W1, P[i1:i2, i2:])
    del Wq, U, P

    if order is not None:
        Q = Q[:, torch.argsort(order)]
    W_hat = Q.float()
    packed = codec.pack(torch.cat(codes, 1), params)

    D = Q - W_orig
    info = {"damp": damp, "proxy_loss": float(((D @ H_orig) * D).sum()), "dead_columns": int(dead.numel())}
    if H_cross is not None:
        cross = H_cross.detach().to(dev, dtype)
        info["asym_proxy_loss"] = info["proxy_loss"] - 2.0 * float(((W_orig @ cross) * D).sum())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    info["seconds"] = time.perf_counter() - t0
    return W_hat, packed, info


def _check(W, H, codec, block_size, damp, act_order, static_groups, H_cross, gptaq_alpha):
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"gptq: W must be a 2-D float tensor [rows, cols], got "
                         f"{tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__}")
    rows, cols = W.shape
    for name, M in (("H", H), ("H_cross", H_cross)):
        if M is not None and (not isinstance(M, torch.Tensor) or tuple(M.shape) != (cols, cols)):
            raise ValueError(f"gptq: {name} must be [{cols}, {cols}] for W [{rows}, {cols}], got "
                             f"{tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__}")
        if M is not None and not torch.isfinite(M).all():
            raise ValueError(f"gptq: {name} has NaN or infinite entries")
    if not torch.isfinite(W).all():
        raise ValueError("gptq: W has NaN or infinite entries")
    if (torch.diagonal(H) < 0).any():
        raise ValueError("gptq: H has negative diagonal entries; it is not (2/N) Σ x xᵀ")
    bw = codec.block_width
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % bw:
        raise ValueError(f"gptq.block_size must be a positive multiple of the codec's block_width ({bw}), "
                         f"got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"gptq.damp must be a finite number >= 0, got {damp!r}")
    if isinstance(gptaq_alpha, bool) or not isinstance(gptaq_alpha, (int, float)) or not math.isfinite(gptaq_alpha):
        raise ValueError(f"gptq.gptaq_alpha must be a finite number, got {gptaq_alpha!r}")
    for name, v in (("act_order", act_order), ("static_groups", static_groups)):
        if not isinstance(v, bool):
            raise ValueError(f"gptq.{name} must be true or false, got {v!r}")
    g = codec.group_of(cols)
    if g % bw:
        raise ValueError(f"gptq: {codec.name} has group size {g}, not a multiple of its block_width {bw}")
    if act_order and not static_groups and g < cols:
        raise ValueError(f"gptq.static_groups: act_order with {codec.name} ({cols // g} groups per row) needs "
                         f"static_groups: true, so groups stay on the stored column grid")
    return rows, cols, bw, g


def _slice(importance: torch.Tensor | None, start: int, g: int) -> torch.Tensor | None:
    return None if importance is None else importance[start:start + g].float()


def _act_order(hdiag: torch.Tensor, bw: int) -> torch.Tensor:
    """Column order by descending diag(H), moving whole bw-column blocks (scalar codecs: bw = 1)."""
    score = hdiag.reshape(-1, bw).sum(1)
    blocks = torch.argsort(score, descending=True, stable=True)
    return (blocks[:, None] * bw + torch.arange(bw, device=hdiag.device)).flatten()


def _current(Wq, W1, E1, U, P, i1, i2, j, a, b):
    """Columns a..b (a inside the current block) with every update so far applied.

    Past the block end the lazy updates of the block's first j columns are still pending.
    """
    inside = W1[:, a - i1:min(b, i2) - i1]
    if b <= i2:
        return inside
    beyond = Wq[:, i2:b] - E1[:, :j] @ U[i1:i1 + j, i2:b]
    if P is not None:
        beyond = beyond + W1[:, :j] @ P[i1:i1 + j, i2:b]
    return torch.cat([inside, beyond], 1)


def _inverse_upper_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """U upper triangular with UᵀU = (H + damp·mean(diag H)·I)⁻¹, raising damp tenfold on failure."""
    mean_diag = torch.diagonal(H).mean()
    for attempt in range(MAX_DAMP_RAISES + 1):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        if attempt == MAX_DAMP_RAISES:
            break
        raised = damp * 10 if damp > 0 else 1e-4
        warnings.warn(f"gptq: Cholesky of the damped Hessian failed at damp={damp:g}; retrying with damp={raised:g}",
                      RuntimeWarning, stacklevel=3)
        damp = raised
    raise ValueError(f"gptq: H is not positive definite even with damp={damp:g} "
                     f"(after {MAX_DAMP_RAISES} tenfold raises); it is not a valid Hessian")
