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
bw = 1 gives GPTQ back). block_size must be a multiple of bw. A codec with `ragged_tail` (dn) and one
group per row may end a row in one shorter block of cols mod bw columns, handed last.

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

Implementation (same algorithm, fewer flops and less memory traffic; tests/test_gptq_fast.py
checks it against a plain per-column GPTQ):
- No inverse. With L = chol(J H J) (J reverses the order), R = J L J is upper triangular with
  R Rᵀ = H (damped) and U = R⁻¹. W0 - Q = E U gives E = D R with D = W0 - Q, so the value of
  column block B when it is rounded is W0_B + Σ_{k before B} D_k A[k, B] with A = R ·
  blockdiag(R_BB)⁻¹: the feedback needs one Cholesky (the reference: Cholesky, inverse and a
  second Cholesky, 4× the flops) and carries D instead of E. For columns not yet reached
  these sums are partial; a group fitted on the fly gets its current weights from them by
  one g × g triangular system (`_current`). GPTAQ's P needs U, so GPTAQ computes U = R⁻¹ and
  runs the same loop in the U form (X = E, update -X U).
- Wᵀ layout: each column is a contiguous row, so per-column reads, writes and rank-1 updates
  are contiguous and the lazy updates are matmuls with transposed factor slices.
- Two-level blocking: rank-1 updates only inside sub-blocks of SUB_BLOCK columns, one matmul
  per sub-block for the rest of its block, one per block for the columns after it.
- Scalar codecs with `column_quantizer` (uniform) round a column with a few in-place ops
  into preallocated buffers, bit for bit their `quantize`.
- Memory (the largest matrices of a 70 B model have cols² Hessians of GBs): the factor is a blocked
  Cholesky in place (`_cholesky_`), in the Hessian's own memory when the caller hands it over
  (`overwrite_h`, as a run's solver does), so H, R and A share one cols² matrix; the original
  columns W0 are gathered per block instead of copied whole; a rounded column's row of Wᵀ takes
  its grid values (no second rows × cols matrix unless GPTAQ or the losses read it); the codes
  are int16 and packed a chunk at a time; Ŵ comes back as a transposed view.
- The proxy loss comes from ‖E‖² (U H_damped Uᵀ = I) minus the damping and dead-column
  terms, unless these cancel more than half of it; then (and for vector codecs and GPTAQ)
  from the product with H.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any

from pydantic import Field

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed
from quantatlas.quant.config import FIRST_DEFAULT, SolverConfig
from quantatlas.quant.solvers.base import Solver

#: how many times damp is multiplied by 10 before giving up on a Hessian
MAX_DAMP_RAISES = 4
#: columns per sub-block: rank-1 updates stay inside one, a matmul carries them to the rest of the block
SUB_BLOCK = 16
#: block size of the in-place Cholesky (a matrix this size or smaller is one torch cholesky call)
CHOLESKY_BLOCK = 256


class GPTQConfig(SolverConfig):
    name = "gptq"
    seeded = True   # the calibration draw follows the seed
    block_size: int = Field(128, gt=0)
    damp: float = Field(0.01, ge=0, allow_inf_nan=False)
    #: act_order and static_groups on by default since the sweep of experiments/gptq/defaults_int*.yaml
    #: (issue 25: at 4, 3 and 2 bits both lower KLD); first released off, so ids without them keep their meaning
    act_order: bool = Field(True, json_schema_extra={FIRST_DEFAULT: False})
    static_groups: bool = Field(True, json_schema_extra={FIRST_DEFAULT: False})
    importance_from_hessian: bool = True
    #: random-sign Hadamard on both sides of W and H ← V H Vᵀ (quant/incoherence.py), signs from the run seed
    incoherence: bool = False

    def build(self):
        return GPTQ(self)

    def for_codec(self, codec) -> "GPTQConfig":
        """These options as they run with `codec` (a codec config): where the arm writes neither act_order
        nor static_groups and the codec does better without them (`CodecConfig.act_order_helps`), both
        off, as first released; so a lattice arm's bare spelling keeps its id and its results."""
        if getattr(codec, "act_order_helps", True) or {"act_order", "static_groups"} & self.model_fields_set:
            return self
        return self.model_copy(update={"act_order": False, "static_groups": False})

    def codec_conflict(self, codec) -> tuple[str, str] | None:
        """(option, why) where these options cannot run with `codec` (a codec, or its `name`,
        `block_width` and `group_size`) on any matrix of more than one group: what `_check` refuses at
        run time, found from the configs before any compute (spec.Arm). None when they go together."""
        bw = codec.block_width
        if self.block_size % bw:
            return "block_size", (f"block_size must be a multiple of {codec.name}'s block_width {bw} (the columns "
                                  f"it quantizes together), got {self.block_size}")
        if self.act_order and not self.static_groups and codec.group_size is not None:
            return "act_order", (f"act_order with {codec.name} (groups of {codec.group_size} columns) needs "
                                 "static_groups: true, so groups stay on the stored column grid")
        return None


class GPTAQConfig(GPTQConfig):
    name = "gptaq"
    gptaq_alpha: float = Field(1.0, ge=0, le=1, allow_inf_nan=False)   # P scaled: 1 the paper, 0.25 its code

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
            # the Hessian is handed over (Solver.solve): popped, so its memory goes once the factor is made
            w_hat, packed, _info = gptq(W, stats.pop("hessian"), codec, H_cross=cross, losses=False,
                                        overwrite_h=True, **opts)
            return w_hat, packed
        # incoherence processing: solve W' = U W Vᵀ against H' = V H Vᵀ, return Ŵ = Uᵀ Ŵ' V
        from quantatlas.quant.incoherence import Incoherence

        inc = Incoherence(*W.shape, self.next_tensor_seed())
        w_rot, packed, _info = gptq(inc.weight(W.double()), inc.hessian(stats.pop("hessian").double()), codec,
                                    H_cross=None if cross is None else inc.hessian(cross.double()),
                                    losses=False, overwrite_h=True, **opts)
        return inc.unweight(w_rot.double()).float(), inc.wrap(packed)

    def can_batch(self, codec, W) -> bool:
        """`gptq_batched` takes it: plain GPTQ (no cross term, no incoherence: no per-matrix random signs),
        a batchable codec, group parameters fixed before the column loop."""
        cfg = self.cfg
        return (self.name == "gptq" and not cfg.incoherence and batchable(codec, W)
                and (cfg.static_groups or cfg.act_order or codec.group_of(W.shape[1]) == W.shape[1]))

    def solve_batch(self, Ws, stats_list, codec):
        if not all(self.can_batch(codec, W) for W in Ws):
            return super().solve_batch(Ws, stats_list, codec)
        opts = self.cfg.model_dump()
        del opts["incoherence"]
        return gptq_batched(Ws, [s.pop("hessian") for s in stats_list], codec, **opts)


def gptq(W: torch.Tensor, H: torch.Tensor, codec: Codec, *, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False, static_groups: bool = False, importance_from_hessian: bool = True,
         H_cross: torch.Tensor | None = None, gptaq_alpha: float = 1.0,
         losses: bool = True, overwrite_h: bool = False) -> tuple[torch.Tensor, Packed, dict]:
    """Quantize W [rows, cols] with `codec` against H [cols, cols]; GPTAQ when H_cross is given.

    Returns (Ŵ float32 in the original column order (column-major), the codec's Packed with decode(Packed) == Ŵ,
    info: damp used, proxy_loss tr((Ŵ-W) H (Ŵ-W)ᵀ) with the undamped H, dead_columns, seconds,
    and with H_cross asym_proxy_loss = (2/N)(‖W X̃ - Ŵ X‖² - ‖W X̃ - W X‖²)). losses=False leaves
    the losses out (None): for GPTAQ and vector codecs they cost two or one rows × cols² products,
    and solvers inside a quantization run do not use them. overwrite_h=True (with losses=False) lets
    the Cholesky factor be computed in H's memory, so H must not be used afterwards (as scipy's
    overwrite_a): a solver that owns the Hessian saves a cols² matrix.
    """
    t0 = time.perf_counter()
    rows, cols, bw, g = _check(W, H, codec, block_size, damp, act_order, static_groups, H_cross, gptaq_alpha)
    codec = codec.for_matrix(W.detach())   # a per-matrix part (NVFP4's tensor scale) from W as given
    dev = W.device
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32  # fp32 unless given fp64
    W_orig = W.detach().to(dtype)
    Hd = H.detach().to(dev, dtype)
    H_orig = Hd if losses else None   # the undamped H, for the losses
    # Hd may become the factor's workspace (no copy of a cols² matrix) when it is a converted copy or
    # the caller gave H away, and the losses do not need it
    owned = not losses and (overwrite_h or Hd.data_ptr() != H.data_ptr())
    del H
    hdiag = torch.diagonal(Hd).clone()
    importance = hdiag if importance_from_hessian else None

    # dead inputs: nothing to preserve there; H_jj = 1 keeps H invertible
    dead = torch.nonzero(hdiag == 0).flatten()
    # the loop works on Wᵀ (positions × rows, one contiguous row per column): column reads and writes
    # and the rank-1 updates touch contiguous memory, and the lazy updates are matmuls with Uᵀ slices
    Wt = W_orig.t().contiguous()
    Wt[dead] = 0
    if dead.numel():
        if not owned:
            Hd, owned = Hd.clone(), True
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
            params[gi] = codec.fit(Wt[gi * g:(gi + 1) * g].t().contiguous(), _slice(importance, gi * g, g))

    order = _act_order(torch.diagonal(Hd), bw) if act_order else None
    if order is not None:
        Wt = Wt[order]
        Hd = Hd[order]   # two steps: one reordered copy at a time
        Hd, owned = Hd[:, order], True
        C = None if C is None else C[order][:, order]
    column_at = order.tolist() if order is not None else range(cols)  # original column of each position
    is_dead = torch.zeros(cols, dtype=torch.bool, device=dev)
    is_dead[dead] = True
    if order is not None:
        is_dead = is_dead[order]

    def w0(a: int, b: int) -> torch.Tensor:
        """Rows a..b of the original Wᵀ (dead columns zeroed, in position order), gathered when needed
        instead of a whole copy of W kept for the loop."""
        block = W_orig[:, a:b] if order is None else W_orig[:, order[a:b]]
        block = block.t().contiguous()
        block[is_dead[a:b]] = 0
        return block

    R, damp, lam = _upper_factor(Hd, damp, overwrite=owned)
    del Hd
    P, rdiag = None, None
    if C is None:
        # GPTQ / LDLQ straight from the factor (no inverse): M = A, alpha = +1, X = D = W0 - Q
        rdiag = torch.diagonal(R).clone() if bw == 1 else None
        M, alpha = _scaled_by_diagonal_blocks(R, bw), 1.0
    else:
        # GPTAQ: M = U = R⁻¹, alpha = -1, X = E; P needs U anyway
        M, alpha = torch.linalg.solve_triangular(R, torch.eye(cols, device=dev, dtype=dtype), upper=True), -1.0
        block_of = torch.arange(cols, device=dev) // bw
        later = block_of[None, :] > block_of[:, None]  # position k is free after position i's block is fixed
        # P = ((C Uᵀ) ⊙ later) U with U = R⁻¹: two triangular solves (half the flops of two products)
        CUt = torch.linalg.solve_triangular(R.T, C, upper=False, left=False)      # X Rᵀ = C
        P = torch.linalg.solve_triangular(R, CUt.mul_(later), upper=True, left=False)
        if gptaq_alpha != 1.0:
            P.mul_(gptaq_alpha)
        del C, later, CUt
    del R
    a_form = alpha > 0   # A form: X = W0 - Q needs the original columns (w0)

    # rows of Wt hold each column's value when it is rounded; the lazy updates go to later rows only, so
    # a rounded column's row is free for its grid values unless GPTAQ's update or the loss still reads it
    Qt = Wt if P is None and not losses else torch.empty_like(Wt)
    fast = bw == 1 and type(codec).column_quantizer is not Codec.column_quantizer
    if fast:
        Ct = torch.empty(cols, rows, device=dev, dtype=torch.int16)  # the codes by position
        code = torch.empty(rows, device=dev, dtype=torch.float32)    # one column's codes as the rounder writes them
        v32 = None if dtype == torch.float32 else torch.empty(rows, device=dev, dtype=torch.float32)
        rounders: list[Any] = [None] * n_groups
    codes: list = [None] * -(-cols // bw)  # generic path: the codec's codes per bw-column block, original order
    Xt = torch.empty(block_size, rows, device=dev, dtype=dtype)  # the block's fed-forward errors, by position
    esq = torch.zeros((), device=dev, dtype=torch.float64)       # ‖E‖², for the proxy loss (A form, bw 1)
    sub_size = max(bw, SUB_BLOCK // bw * bw)
    dynamic = not (static_groups or act_order)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        src = w0(i1, i2) if a_form else Wt[i1:i2]   # X = W0 - Q (A form) or (current - Q) scaled (U form)
        a = i1
        while a < i2:
            # a sub-block: rank-1 (rank-bw) updates stay inside it, one matmul carries it to the block's rest;
            # a group fitted on the fly starts a sub-block, so its columns are current when it is fitted
            se = min(a + sub_size, i2)
            if dynamic:
                se = min(se, (a // g + 1) * g)
            if fast:   # scalar codec with a fused column rounding: the same steps with fewer Python ops
                _scalar_sub_block(Wt, Qt, Ct, code, Xt, src, M, P, alpha, a, se, i1, g, column_at, params,
                                  rounders, codec, v32, lambda p, gi: _current(Wt, Xt, M, alpha, P, i1, i2, p,
                                                                               p + g, w0), importance)
                bw_loop = range(0)
            else:
                bw_loop = range(a, se, bw)
            for p in bw_loop:
                gi, col = divmod(column_at[p], g)
                if params[gi] is None:  # fitted on the fly: no act_order here, so position == column
                    cur = _current(Wt, Xt, M, alpha, P, i1, i2, p, p + g, w0)
                    params[gi] = codec.fit(cur.t().contiguous(), _slice(importance, p, g))
                j = p - i1
                w, q, x = Wt[p:p + bw], Qt[p:p + bw], Xt[j:j + min(bw, cols - p)]   # a ragged tail: shorter
                quantized = codec.quantize(w.t(), params[gi], col)
                codes[column_at[p] // bw] = quantized.codes
                q.copy_(quantized.values.t())
                torch.sub(src[j:j + bw], q, out=x)
                if not a_form:
                    if bw == 1:
                        x.div_(M[p, p])
                    else:
                        x.copy_(torch.linalg.solve_triangular(M[p:p + bw, p:p + bw].t(), x, upper=False))
                if p + bw < se:
                    if bw == 1:
                        Wt[p + 1:se].addr_(M[p, p + 1:se], x[0], alpha=alpha)
                        if P is not None:
                            Wt[p + 1:se].addr_(P[p, p + 1:se], w[0])
                    else:
                        Wt[p + bw:se].addmm_(M[p:p + bw, p + bw:se].t(), x, alpha=alpha)
                        if P is not None:
                            Wt[p + bw:se].addmm_(P[p:p + bw, p + bw:se].t(), w)
            if se < i2:
                Wt[se:i2].addmm_(M[a:se, se:i2].t(), Xt[a - i1:se - i1], alpha=alpha)
                if P is not None:
                    Wt[se:i2].addmm_(P[a:se, se:i2].t(), Wt[a:se])
            a = se
        if losses and a_form and rdiag is not None:
            e = torch.sub(Wt[i1:i2], Qt[i1:i2]).mul_(rdiag[i1:i2, None])   # E = (current - Q) R_qq
            esq += torch.dot(e.flatten(), e.flatten()).double()
            del e
        if i2 < cols:
            Wt[i2:].addmm_(M[i1:i2, i2:].t(), Xt[:i2 - i1], alpha=alpha)
            if P is not None:
                Wt[i2:].addmm_(P[i1:i2, i2:].t(), Wt[i1:i2])
    del Wt, M, P, Xt, src

    inverse = None if order is None else torch.argsort(order)
    if inverse is not None:
        Qt = Qt[inverse]
    Q = Qt.t()   # a transposed view: no second rows × cols matrix at the largest moment of a run
    del Qt
    W_hat = Q.float()
    if fast:
        Ct = Ct if inverse is None else Ct[inverse]
        all_codes = Ct.t()   # int16: pack_bits widens a chunk at a time
        del Ct
    else:
        all_codes = torch.cat(codes, 1)
    packed = codec.pack(all_codes, params)
    del all_codes

    info = {"damp": damp, "proxy_loss": None, "dead_columns": int(dead.numel())}
    if H_cross is not None:
        info["asym_proxy_loss"] = None
    if losses:
        _losses(info, Q, W_orig, H_orig, H_cross, dead, esq, lam, a_form and rdiag is not None)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    info["seconds"] = time.perf_counter() - t0
    return W_hat, packed, info


#: the most weights one batch of `gptq_batched` holds (its Wᵀ and W0ᵀ copies and codes are this size each)
BATCH_WEIGHTS = 1 << 25


def batchable(codec: Codec, W: torch.Tensor) -> bool:
    """Whether `gptq_batched` can take matrices like W with `codec`: the fast scalar path (block width 1, a
    `column_quantizer`), no per-matrix part in the codec (`for_matrix` is the codec itself), float32."""
    return (codec.block_width == 1 and type(codec).column_quantizer is not Codec.column_quantizer
            and W.dtype != torch.float64 and codec.for_matrix(W.detach()) is codec)


def gptq_batched(Ws: list[torch.Tensor], Hs: list[torch.Tensor], codec: Codec, *, block_size: int = 128,
                 damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                 importance_from_hessian: bool = True) -> list[tuple[torch.Tensor, Packed]]:
    """GPTQ on several matrices of one shape, each against its own Hessian (the experts of one role in a
    mixture-of-experts layer), with the per-column work done once for all of them: (Ŵ, Packed) per matrix,
    what `gptq(W, H, codec, losses=False, ...)` returns for each, bit for bit (tests/test_gptq_batched.py).

    The same steps as `gptq`'s A form with a scalar codec: each matrix's dead columns, damping, Cholesky
    factor, act order and group parameters are its own (a loop over matrices: one factor each), then one
    loop over column positions rounds position p of every matrix at once ([E, rows] through the codec's
    `column_quantizer`, its parameters gathered per matrix: with act order the same position holds different
    columns and groups), and the updates are batched (addcmul inside a sub-block, baddbmm across blocks:
    the same float operations as `gptq`'s addr and addmm). Needs `batchable(codec, W)`, and fixed group
    parameters (static_groups or act_order, or one group per row); the Hessians are handed over (overwritten).
    Matrices are taken BATCH_WEIGHTS weights at a time.
    """
    if not Ws:
        return []
    rows, cols = Ws[0].shape
    chunk = max(1, BATCH_WEIGHTS // max(rows * cols, 1))
    if len(Ws) > chunk:
        return [r for i in range(0, len(Ws), chunk)
                for r in gptq_batched(Ws[i:i + chunk], Hs[i:i + chunk], codec, block_size=block_size, damp=damp,
                                      act_order=act_order, static_groups=static_groups,
                                      importance_from_hessian=importance_from_hessian)]
    E = len(Ws)
    for W, H in zip(Ws, Hs):
        if tuple(W.shape) != (rows, cols):
            raise ValueError(f"gptq_batched: matrices of one shape, got {tuple(W.shape)} and {(rows, cols)}")
        _, _, bw, g = _check(W, H, codec, block_size, damp, act_order, static_groups, None, 1.0)
        if not batchable(codec, W):
            raise ValueError(f"gptq_batched: {codec.name} cannot be solved in a batch (see batchable)")
    n_groups = cols // g
    if not (static_groups or act_order) and n_groups > 1:
        raise ValueError("gptq_batched: groups fitted on the fly need `gptq` (static_groups or act_order here)")
    dev = Ws[0].device
    Wt = torch.empty(E, cols, rows, device=dev)       # per matrix: Wᵀ by position (act order applied)
    M = torch.empty(E, cols, cols, device=dev)        # per matrix: A = R · diag(R)⁻¹ (see `gptq`)
    group_at = torch.empty(E, cols, dtype=torch.long, device=dev)   # the group of the column at each position
    order_back: list[torch.Tensor | None] = []
    params: list[list[Any]] = []
    for e, (W, H) in enumerate(zip(Ws, Hs)):
        Hd = H.detach().to(dev, torch.float32)
        hdiag = torch.diagonal(Hd).clone()
        importance = hdiag if importance_from_hessian else None
        dead = torch.nonzero(hdiag == 0).flatten()
        w = W.detach().to(torch.float32).t().contiguous()
        w[dead] = 0
        Hd[dead, dead] = 1
        params.append([codec.fit(w[gi * g:(gi + 1) * g].t().contiguous(), _slice(importance, gi * g, g))
                       for gi in range(n_groups)])
        order = _act_order(torch.diagonal(Hd), 1) if act_order else None
        if order is not None:
            w, Hd = w[order], Hd[order][:, order]
        Wt[e] = w
        group_at[e] = (order if order is not None else torch.arange(cols, device=dev)) // g
        order_back.append(None if order is None else torch.argsort(order))
        R, _, _ = _upper_factor(Hd, damp, overwrite=True)
        M[e] = _scaled_by_diagonal_blocks(R, 1)
        del Hd, R, w
    W0t = Wt.clone()                                  # the original columns, the A form's X = W0 - Q
    rounder_at = _batched_rounders(codec, params, group_at)
    Ct = torch.empty(E, cols, rows, device=dev, dtype=torch.int16)
    code = torch.empty(E, rows, device=dev, dtype=torch.float32)
    Xt = torch.empty(E, block_size, rows, device=dev)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        for a in range(i1, i2, SUB_BLOCK):
            se = min(a + SUB_BLOCK, i2)
            for p in range(a, se):
                w, x = Wt[:, p], Xt[:, p - i1]
                rounder_at(p)(w, None, w, code)           # a rounded position's row takes its grid values
                Ct[:, p].copy_(code)
                torch.sub(W0t[:, p], w, out=x)
                if p + 1 < se:
                    Wt[:, p + 1:se].addcmul_(M[:, p, p + 1:se, None], x[:, None, :])
            if se < i2:
                Wt[:, se:i2].baddbmm_(M[:, a:se, se:i2].transpose(1, 2), Xt[:, a - i1:se - i1])
        if i2 < cols:
            Wt[:, i2:].baddbmm_(M[:, i1:i2, i2:].transpose(1, 2), Xt[:, :i2 - i1])
    del M, W0t, Xt
    out = []
    for e in range(E):
        back = order_back[e]
        q, c = (Wt[e], Ct[e]) if back is None else (Wt[e][back], Ct[e][back])
        out.append((q.t(), codec.pack(c.t(), params[e])))
    return out


def _batched_rounders(codec: Codec, params: list[list[Any]], group_at: torch.Tensor):
    """position -> the codec's column rounder for that position of every matrix: each matrix's parameters of
    the group its column at that position belongs to, stacked [E, rows] (a group parameter object is a
    dataclass of per-row tensors). Rounders are made once per distinct combination of groups."""
    first = params[0][0]
    if not dataclasses.is_dataclass(first):
        raise TypeError(f"gptq_batched: {codec.name}'s group parameters are not a dataclass of per-row tensors")
    E = len(params)
    stacked = {}
    for f in dataclasses.fields(first):
        values = [[getattr(p, f.name) for p in per] for per in params]
        if values[0][0] is None:
            continue
        stacked[f.name] = torch.stack([torch.stack(v) for v in values])       # [E, groups, rows]
    matrix = torch.arange(E, device=group_at.device)
    keys = [tuple(k) for k in group_at.t().tolist()]
    made: dict[tuple, Any] = {}

    def rounder_at(p: int):
        key = keys[p]
        if key not in made:
            gi = group_at[:, p]
            made[key] = codec.column_quantizer(dataclasses.replace(
                first, **{name: t[matrix, gi] for name, t in stacked.items()}))
        return made[key]
    return rounder_at


def _losses(info, Q, W_orig, H_orig, H_cross, dead, esq, lam, from_e: bool) -> None:
    """info["proxy_loss"] (and "asym_proxy_loss" with H_cross); see gptq's docstring."""
    D = Q - W_orig
    if from_e:
        # W0 - Q = E U and U H_damped Uᵀ = I give tr(D0 H_damped D0ᵀ) = ‖E‖², D0 = Q - W0; the undamped H
        # differs by λI and by the 1s on dead diagonals (where H is 0 and D0 = Q): ‖E‖² - λ‖D0‖² - ‖Q_dead‖²
        if dead.numel():
            q_dead = float(Q[:, dead].double().square().sum())
            D[:, dead] = Q[:, dead]
        else:
            q_dead = 0.0
        shift = float(lam) * float(torch.dot(D.flatten(), D.flatten())) + q_dead
        if shift < 0.5 * float(esq):   # little cancellation: as accurate as the direct product
            info["proxy_loss"] = float(esq) - shift
        elif dead.numel():
            D = Q - W_orig
    if info["proxy_loss"] is None:
        info["proxy_loss"] = float(((D @ H_orig) * D).sum())
    if H_cross is not None:
        cross = H_cross.detach().to(W_orig.device, W_orig.dtype)
        info["asym_proxy_loss"] = info["proxy_loss"] - 2.0 * float(((W_orig @ cross) * D).sum())


def _check(W, H, codec, block_size, damp, act_order, static_groups, H_cross, gptaq_alpha):
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"gptq: W must be a 2-D float tensor [rows, cols], got "
                         f"{tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__}")
    rows, cols = W.shape
    for name, M in (("H", H), ("H_cross", H_cross)):
        if M is not None and (not isinstance(M, torch.Tensor) or tuple(M.shape) != (cols, cols)):
            raise ValueError(f"gptq: {name} must be [{cols}, {cols}] for W [{rows}, {cols}], got "
                             f"{tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__}")
        if M is not None and not _finite(M):
            raise ValueError(f"gptq: {name} has NaN or infinite entries")
    if not _finite(W):
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
    if g % bw and not (g == cols and getattr(codec, "ragged_tail", False)):
        raise ValueError(f"gptq: {codec.name} has group size {g}, not a multiple of its block_width {bw}")
    if act_order and not static_groups and g < cols:
        raise ValueError(f"gptq.static_groups: act_order with {codec.name} ({cols // g} groups per row) needs "
                         f"static_groups: true, so groups stay on the stored column grid")
    return rows, cols, bw, g


def _finite(M: torch.Tensor) -> bool:
    """No NaN or ±inf in M: its min and max are finite (NaN propagates), without an M-sized temporary."""
    return M.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(M))).all())


def _slice(importance: torch.Tensor | None, start: int, g: int) -> torch.Tensor | None:
    return None if importance is None else importance[start:start + g].float()


def _act_order(hdiag: torch.Tensor, bw: int) -> torch.Tensor:
    """Column order by descending diag(H), moving whole bw-column blocks (scalar codecs: bw = 1); a
    codec's short last block (`ragged_tail`) stays last."""
    full = hdiag.numel() // bw * bw
    score = hdiag[:full].reshape(-1, bw).sum(1)
    blocks = torch.argsort(score, descending=True, stable=True)
    order = (blocks[:, None] * bw + torch.arange(bw, device=hdiag.device)).flatten()
    if full < hdiag.numel():
        order = torch.cat([order, torch.arange(full, hdiag.numel(), device=hdiag.device)])
    return order


def _scalar_sub_block(Wt, Qt, Ct, code, Xt, src, M, P, alpha, a, se, i1, g, column_at, params, rounders, codec,
                      v32, current, importance):
    """Columns a..se one at a time for a scalar codec with `column_quantizer` (see the loop in gptq)."""
    ws, qs, cs = Wt[a:se].unbind(0), Qt[a:se].unbind(0), Ct[a:se].unbind(0)
    xs, srcs = Xt[a - i1:se - i1].unbind(0), src[a - i1:se - i1].unbind(0)
    Wsub, Msub = Wt[a:se], M[a:se, a:se].unbind(0)
    Psub = None if P is None else P[a:se, a:se].unbind(0)
    n = se - a
    for k in range(n):
        p = a + k
        gi, col = divmod(column_at[p], g)
        rnd = rounders[gi]
        if rnd is None:
            if params[gi] is None:  # fitted on the fly: no act_order here, so position == column
                params[gi] = codec.fit(current(p, gi).t().contiguous(), _slice(importance, p, g))
            rnd = rounders[gi] = codec.column_quantizer(params[gi])
        if v32 is None:
            rnd(ws[k], col, qs[k], code)
        else:
            rnd(ws[k], col, v32, code)
            qs[k].copy_(v32)
        cs[k].copy_(code)
        x = torch.sub(srcs[k], qs[k], out=xs[k])
        if alpha < 0:
            x.div_(Msub[k][k])
        if k + 1 < n:
            Wsub[k + 1:].addr_(Msub[k][k + 1:], x, alpha=alpha)
            if Psub is not None:
                Wsub[k + 1:].addr_(Psub[k][k + 1:], ws[k])


def _current(Wt, Xt, M, alpha, P, i1, i2, a, b, w0):
    """Columns a..b (a starts a sub-block inside the block i1..i2) with every update so far applied
    (the OBS updates of columns < a), as rows of Wᵀ [b - a, rows].

    Rows inside the block have all fed-forward terms of columns < a; past its end the block's
    terms of columns i1..a are still pending and are added here. In the U form (alpha -1) that
    is the current weight. In the A form (alpha +1) it is S = W0 + D A[:a, ·] (D = W0 - Q), which
    for column a is the current value but for later columns only a partial sum; the current
    values are W0 + (S - W0) A_GG⁻¹ with A_GG = A[a:b, a:b] (W0 - Q = E U and E = D R give
    the current W0 - E[:, :a] U[:a, ·] = W0 + D[:, :a] R[:a, a:] U[a:, ·], and U_GG = R_GG⁻¹).
    """
    inside = Wt[a:min(b, i2)]
    if b <= i2:
        cur = inside
    else:
        beyond = torch.addmm(Wt[i2:b], M[i1:a, i2:b].t(), Xt[:a - i1], alpha=alpha)
        if P is not None:
            beyond = beyond + P[i1:a, i2:b].t() @ Wt[i1:a]
        cur = torch.cat([inside, beyond], 0)
    if alpha < 0:
        return cur
    orig = w0(a, b)
    eye = torch.eye(b - a, device=M.device, dtype=M.dtype)
    inv = torch.linalg.solve_triangular(M[a:b, a:b], eye, upper=True)   # g × g; then one matmul (faster than
    return torch.addmm(orig, inv.t(), cur - orig)                            # a triangular solve with rows RHS)


def _scaled_by_diagonal_blocks(R: torch.Tensor, bw: int) -> torch.Tensor:
    """A = R · blockdiag(R_BB)⁻¹ (bw-column diagonal blocks; bw = 1: column q divided by R_qq).

    With W0 - Q = E U and U = R⁻¹, the value of block B when it is rounded is
    W0_B + Σ_{k before B} (W0 - Q)_k A[k, B]: GPTQ's feedback without inverting anything.
    """
    cols = R.shape[0]
    if bw == 1:   # in place: R is not needed afterwards
        return R.div_(torch.diagonal(R).clone()[None, :])
    nb = cols // bw
    if cols % bw:   # a short last block (a codec's `ragged_tail`): R is upper triangular, so A[m:, :m] = 0
        m = nb * bw
        A = torch.zeros_like(R)
        A[:m, :m] = _scaled_by_diagonal_blocks(R[:m, :m].contiguous(), bw)
        A[:, m:] = torch.linalg.solve_triangular(R[m:, m:], R[:, m:], upper=True, left=False)
        return A
    diag_blocks = R.reshape(nb, bw, nb, bw).diagonal(dim1=0, dim2=2).permute(2, 0, 1)   # [nb, bw, bw]
    col_blocks = R.reshape(cols, nb, bw).transpose(0, 1)                                 # [nb, cols, bw]
    A = torch.linalg.solve_triangular(diag_blocks, col_blocks, upper=True, left=False)  # X R_BB = R[:, B]
    return A.transpose(0, 1).reshape(cols, cols)


def _upper_factor(H: torch.Tensor, damp: float, overwrite: bool = False) -> tuple[torch.Tensor, float, torch.Tensor]:
    """R upper triangular with R Rᵀ = H + λI, λ = damp·mean(diag H), raising damp tenfold on failure.

    R is the Cholesky factor of H with rows and columns reversed (J L Lᵀ J with L = chol(J H J)),
    so U = R⁻¹ is the upper factor with UᵀU = (H + λI)⁻¹ that GPTQ's updates use: one
    Cholesky instead of the reference's Cholesky, inverse and second Cholesky. The factor is
    computed in place (`_cholesky_`): in H's memory with `overwrite` (H is then R), otherwise in
    one reversed copy of H.
    """
    mean_diag = torch.diagonal(H).mean()
    A = _reverse_(H) if overwrite else H.flip(0, 1)
    diag = torch.diagonal(A).clone()
    for attempt in range(MAX_DAMP_RAISES + 1):
        lam = damp * mean_diag
        torch.diagonal(A).copy_(diag).add_(lam)
        last = attempt == MAX_DAMP_RAISES
        blocks = None if last else [A[k:k + CHOLESKY_BLOCK, k:k + CHOLESKY_BLOCK].clone()
                                    for k in range(0, A.shape[0], CHOLESKY_BLOCK)]
        if _cholesky_(A) and _finite(torch.diagonal(A)) and bool((torch.diagonal(A) > 0).all()):
            return _reverse_(A), damp, lam
        if last:
            break
        # the strictly upper blocks off the diagonal are untouched: the lower ones and the saved diagonal
        # blocks give A back
        for i, k in enumerate(range(0, A.shape[0], CHOLESKY_BLOCK)):
            e = k + CHOLESKY_BLOCK
            A[k:e, k:e].copy_(blocks[i])
            A[e:, k:e].copy_(A[k:e, e:].T)
        raised = damp * 10 if damp > 0 else 1e-4
        warnings.warn(f"gptq: Cholesky of the damped Hessian failed at damp={damp:g}; retrying with damp={raised:g}",
                      RuntimeWarning, stacklevel=3)
        damp = raised
    raise ValueError(f"gptq: H is not positive definite even with damp={damp:g} "
                     f"(after {MAX_DAMP_RAISES} tenfold raises); it is not a valid Hessian")


def _cholesky_(A: torch.Tensor) -> bool:
    """A ← L (lower, A = L Lᵀ, upper triangle zeroed) in place, reading A's lower triangle: the
    blocked right-looking Cholesky. Per block column k: L_kk = chol(A_kk), L_rest,k = A_rest,k L_kkᵀ⁻¹,
    then A_rest,rest -= L_rest,k L_rest,kᵀ on its lower block columns only. Temporaries are one
    panel, not a second matrix (torch's cholesky writes a new one). False if A is not positive
    definite; then the strictly upper blocks off the diagonal are still A's."""
    n, block = A.shape[0], CHOLESKY_BLOCK
    for k in range(0, n, block):
        e = min(k + block, n)
        L11, info = torch.linalg.cholesky_ex(A[k:e, k:e])
        if int(info):
            return False
        A[k:e, k:e].copy_(L11)
        if e < n:
            L21 = torch.linalg.solve_triangular(L11.T, A[e:, k:e], upper=True, left=False)   # X L11ᵀ = A21
            A[e:, k:e].copy_(L21)
            for j in range(e, n, block):
                A[j:, j:j + block].addmm_(L21[j - e:], L21[j - e:j - e + block].T, alpha=-1)
    A.tril_()
    return True


def _reverse_(M: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """M.flip(0, 1) in place for a dense square M, row- or column-major (its storage reversed), with
    a chunk-sized temporary instead of a second matrix; any other layout gets a flipped copy."""
    if not (M.is_contiguous() or M.t().is_contiguous()):
        return M.flip(0, 1)
    flat = M.as_strided((M.numel(),), (1,))
    n = flat.numel()
    for a in range(0, n // 2, chunk):
        b = min(a + chunk, n // 2)
        low, high = flat[a:b], flat[n - b:n - a]
        tmp = low.flip(0)
        low.copy_(high.flip(0))
        high.copy_(tmp)
    return M
