"""PV-Tuning (Malinovskii et al. 2024, "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM
Compression"): finetune recovery that moves the discrete codes as well as the continuous parameters.

A quantized matrix is W(codes, θ): discrete codes and continuous parameters θ (the scales; AQLM's
codebooks too). The loss is kd_ste's, KL(P_fp ‖ P_q) over every calibration position. Each step makes
one forward/backward pass on a mini-batch and then

    P-step   Adam on θ (and the fp16 norm gains with `train: scales_norms`), codes fixed: lr `lr` on the
             scales (trained as s₀·m, so a relative step, as kd_ste's) and the norms, lr `codebook_lr` on
             AQLM's codebooks (null: `lr`; 0 freezes them, and P-steps alone are then kd_ste on the scales);
    buffer   the straight-through buffer B (one fp32 matrix per quantized matrix, in the codec's basis,
             starting at W) takes an Adam step on ∂L/∂W, lr `v_lr` · RMS(W₀) (a step relative to the
             matrix's size, so one value suits every matrix): the "linearized V step"'s target;
and every `discrete_every` steps a V-step re-encodes codes:

    V-step   for every code group (the weights one code or code tuple stands for: 1 weight of a scalar
             grid, an 8-vector of E8P / E8, a 4-vector of D4, a g-vector of AQLM with its M codes)
             δ = ‖B − W‖² over the group; the ⌈τ·groups⌉ groups of largest δ (τ = `fraction`) get the
             codec's own answer for their buffer under the current θ: rounding to the grid (uniform),
             the exact nearest lattice point (e8p, d4, e8), beam search over the M codebooks (aqlm, width
             `beam` or the codec's own); the others keep their codes. With `trust_ratio` ρ the changes
             are admitted in order of δ while ‖W_new − W_old‖ ≤ ρ·‖W_old‖ (at least one group).

Why the codebooks get their own lr: they are shared by the whole matrix, so Adam's ~lr step on every
entry moves every weight of the matrix at once, coherently, where a scale's step moves one row. On the
reference model (AQLM 2×8, int8 codebooks, seed 0, 100 steps of 4×256 tokens, V-steps off) `lr` 0.01 on
the codebooks *raised* the training KL 0.0056 → 0.0079 (eval KLD 0.00744 vs 0.00673 untuned; kd_ste on
the scales: 0.00374); codebook lr 1e-3: 0.00347; 1e-4: 0.00373 (the codebooks then barely move past their
int8 step). The codebooks are in units of the row scale (weights / s_r, RMS ≈ 1 per vector), so an
absolute lr there is already one relative to each matrix's size.

B is never reset: it accumulates the straight-through updates (the paper's "delta decay" 1), so a group
whose buffer has drifted past what its codes can express stays among the largest δ.

Stored precision in the loop: scales pass through fp16 and AQLM's codebooks through their stored
rounding (int8 with a per-codebook scale, or fp16) with a straight-through gradient, so what trains is
exactly what is stored; the result is re-packed in the codec's own format (same tensors, same bits) and
the model's weight is set to decode(Packed). Incoherence packs are tuned in their rotated basis (the
buffer lives there; the forward weight is Uᵀ (·) V). A seed fixes the data (the windows and the order
of mini-batches are the caller's); the steps themselves are deterministic.

Supported codecs: uniform (both grids), e8p (2 bits: its residual 3- and 4-bit codes are greedy, not
the nearest point of their own value, and are refused), d4, e8, aqlm; any other is refused with the
field named.
"""
from __future__ import annotations

import math

from quantatlas._lazy import nn, no_grad, torch

#: codecs whose code groups the V-step can re-encode (the module docstring says how)
SUPPORTED = ("uniform", "e8p", "d4", "e8", "aqlm")


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(P_teacher ‖ P_student) (kd_ste's loss)."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 in the forward pass, the identity in the backward pass."""
    return x + (x.half().float() - x).detach()


def codec_of_pack(packed):
    """The run codec that made `packed` (its config holds the run's seed already)."""
    from quantatlas.quant.config import build, fill_first_defaults

    config = {k: v for k, v in packed.config.items() if k != "incoherence"}
    return build("codec", fill_first_defaults({packed.codec: config}))


def split_basis(packed):
    """(inner Packed in the codec's basis, Incoherence or None)."""
    from quantatlas.quant.incoherence import Incoherence, IncoherentPacked

    if not isinstance(packed, IncoherentPacked):
        return packed, None
    return packed.inner, Incoherence(*packed.shape, packed.seed)


# -- code groups of one matrix ---------------------------------------------------------------------

class CodeGroups:
    """One packed matrix as (codes, θ) in the codec's basis. The matrix [rows, cols] is cut into code
    groups of `d` consecutive columns; `codes` [rows, cols/d, c] holds each group's c codes.

    weight()                      W(codes, θ), differentiable in θ
    search(t, r, j)               the codec's answer for targets t [n, d] at groups (r, j) under the
                                  current θ: (values [n, d], codes [n, c], state for `assign`)
    assign(r, j, codes, state)    set those groups' codes
    finalize()                    the inner Packed of the current codes and θ
    """

    d: int
    codes: torch.Tensor
    params: list                # the scale multipliers (the P-step's lr `lr`)
    codebook_params: list = []  # AQLM's shared codebooks (the P-step's lr `codebook_lr`)

    def groups_of(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], -1, self.d)


class ScaledCodes(CodeGroups):
    """Uniform grids and block lattices: W = base(codes) ⊙ expand(S), S the pack's fp16 `scale`
    [rows, scale groups] (trained as S₀·m, m from 1, so `lr` is a relative step); base is the
    unit-scale grid value (uniform: q − z; lattices: the lattice point)."""

    def __init__(self, packed, codec):
        from quantatlas.quant.codecs.lattice import BlockLattice
        from quantatlas.quant.codecs.uniform import Uniform

        self.packed, self.codec = packed, codec
        self.uniform = isinstance(codec, Uniform)
        if not (self.uniform or isinstance(codec, BlockLattice)):
            raise ValueError(f"recovery.method: pv_tuning re-encodes codes of {', '.join(SUPPORTED)}; got {packed.codec}")
        rows, cols = packed.shape
        data = packed.data
        self.d = codec.block_width
        self.g = codec.group_of(cols)                       # columns per scale group
        self.s0 = data["scale"].float().reshape(rows, -1).clone()
        self.zero = data["zero"].float().reshape(rows, -1).clone() if "zero" in data else None
        self.mult = nn.Parameter(torch.ones_like(self.s0))
        self.params = [self.mult]
        # the unit-scale values and each group's code: the codec's own quantize of the unit-scale decode
        ones = type(packed)(packed.codec, packed.config, packed.shape, {**data, "scale": torch.ones_like(data["scale"])})
        unit = codec.decode(ones).float()
        G, dev = cols // self.d, unit.device
        r = torch.arange(rows, device=dev).repeat_interleave(G)
        j = torch.arange(G, device=dev).repeat(rows)
        values, codes = self.quantize(self.groups_of(unit).reshape(-1, self.d), torch.ones(rows * G, device=dev), r, j)
        self.base = values.reshape(rows, cols)
        self.codes = codes.reshape(rows, G, -1)
        if not torch.equal(self.base, unit):
            raise ValueError(f"recovery.method: pv_tuning needs every stored code to be the codec's own answer "
                             f"for its value (a greedy residual code such as e8p bits 3/4 is not); got {packed.codec} "
                             f"{packed.config}")
        check = self.finalize(self.s0)
        for k, v in data.items():
            if not torch.equal(check.data[k], v):
                raise ValueError(f"recovery.method: pv_tuning cannot rebuild {packed.codec}'s stored `{k}`")

    def params_of(self, scale: torch.Tensor, zero: torch.Tensor | None):
        """The codec's own parameter object for rows of these scales (and zero points)."""
        if self.uniform:
            from quantatlas.quant.codecs.uniform import UniformParams

            return UniformParams(scale, zero)
        from quantatlas.quant.codecs.lattice import ScaleParams

        return ScaleParams(scale)

    def quantize(self, t, scale, r, j):
        """codec.quantize of targets t [n, d] (group j of row r), each with its own scale: (values, codes)."""
        zero = None if self.zero is None else self.zero[r, (j * self.d) // self.g]
        q = self.codec.quantize(t, self.params_of(scale, zero), 0)
        return q.values.float(), q.codes.reshape(t.shape[0], -1).long()

    @property
    def scale(self) -> torch.Tensor:
        return fp16_ste(self.s0 * self.mult)

    def weight(self) -> torch.Tensor:
        return self.base * self.scale.repeat_interleave(self.g, 1)

    @no_grad
    def search(self, t, r, j):
        s = self.scale.detach()[r, (j * self.d) // self.g]
        values, codes = self.quantize(t, s, r, j)
        # the unit-scale value of each new code (values / s is within rounding of it; the nearest grid or
        # lattice point of it is exactly it, and the code must come out the same)
        unit_t = torch.where(s[:, None] != 0, values / torch.where(s != 0, s, torch.ones_like(s))[:, None],
                             torch.zeros_like(values))
        unit, again = self.quantize(unit_t, torch.ones_like(s), r, j)
        if not torch.equal(again, codes):
            raise ValueError(f"recovery.method: pv_tuning: {self.packed.codec}'s unit-scale codes disagree")
        return values, codes, unit

    @no_grad
    def assign(self, r, j, codes, unit) -> None:
        self.codes[r, j] = codes
        self.base.view(self.base.shape[0], -1, self.d)[r, j] = unit

    @no_grad
    def finalize(self, scale: torch.Tensor | None = None):
        s = (self.scale.detach() if scale is None else scale).half()
        rows = s.shape[0]
        per_group = self.g // self.d
        params = [self.params_of(s[:, k].float(), None if self.zero is None else self.zero[:, k])
                  for k in range(s.shape[1])]
        out = self.codec.pack(self.codes.reshape(rows, -1), params)
        data = {**out.data, "scale": s.reshape(self.packed.data["scale"].shape)}
        assert self.codes.shape[1] == per_group * s.shape[1]
        return type(self.packed)(self.packed.codec, self.packed.config, self.packed.shape, data)


class AQLMCodes(CodeGroups):
    """AQLM: W_r[v] = s_r · Σ_m C_m[c_{r,v,m}]; θ = the codebooks C [M, K, g] (stored rounding in the loop)
    and the row scales s (trained as s₀·m). The V-step's search is the codec's beam search (weights 1:
    the buffer is matched in plain squared error, as the paper's V-step does)."""

    def __init__(self, packed, codec, beam: int | None):
        from quantatlas.quant.codecs.gptvq import load_codebook, unpack_wide

        self.packed, self.codec = packed, codec
        self.search_codec = codec if beam is None or beam == codec.cfg.beam else \
            type(codec)(codec.cfg.model_copy(update={"beam": beam}))
        rows, cols = packed.shape
        self.d, self.m = codec.g, codec.m
        data = packed.data
        n = rows * cols // self.d * self.m
        self.codes = unpack_wide(data, codec.b, n).reshape(rows, cols // self.d, self.m).long()
        self.books = nn.Parameter(load_codebook(data["codebook"], data.get("codebook_scale")).float().clone())
        dev = self.books.device
        self.s0 = data["scale"].float().clone() if "scale" in data else torch.ones(rows, device=dev)
        self.mult = nn.Parameter(torch.ones_like(self.s0))
        self.params = [self.mult] if codec.cfg.scales else []
        self.codebook_params = [self.books]
        check = self.finalize()
        for k, v in data.items():
            if not torch.equal(check.data[k], v):
                raise ValueError(f"recovery.method: pv_tuning cannot rebuild aqlm's stored `{k}`")

    @property
    def codebooks(self) -> torch.Tensor:
        """The codebooks as stored (int8 with one fp16 scale per codebook, or fp16), straight-through."""
        from quantatlas.quant.codecs.gptvq import load_codebook, store_codebook

        stored = load_codebook(*store_codebook(self.books.detach(), self.codec.cfg.codebook_bits))
        return self.books + (stored - self.books).detach()

    @property
    def scale(self) -> torch.Tensor:
        return fp16_ste(self.s0 * self.mult) if self.codec.cfg.scales else self.s0

    def weight(self) -> torch.Tensor:
        return self.codec.values(self.codes.reshape(self.codes.shape[0], -1), self.codebooks, self.scale)

    def stored_params(self, scale: torch.Tensor):
        return self.codec.make_params(self.books.detach(), scale, torch.ones(self.d, device=self.books.device))

    @no_grad
    def search(self, t, r, j):
        p = self.stored_params(self.scale.detach())
        p.scale = p.scale[r]                       # one row scale per target vector
        q = self.search_codec.quantize(t, p, 0)   # the codec's own beam search
        return q.values.float(), q.codes.reshape(t.shape[0], self.m).long(), None

    @no_grad
    def assign(self, r, j, codes, state) -> None:
        self.codes[r, j] = codes

    @no_grad
    def finalize(self):
        rows = self.codes.shape[0]
        out = self.codec.pack(self.codes.reshape(rows, -1).cpu(), [self.stored_params(self.scale.detach())])
        return type(self.packed)(self.packed.codec, self.packed.config, self.packed.shape, out.data)


def code_groups(packed, codec=None, beam: int | None = None) -> CodeGroups:
    """The (codes, θ) view of an inner (codec-basis) pack."""
    codec = codec_of_pack(packed) if codec is None else codec
    if packed.codec == "aqlm":
        return AQLMCodes(packed, codec, beam)
    if packed.codec not in SUPPORTED:
        raise ValueError(f"recovery.method: pv_tuning re-encodes codes of {', '.join(SUPPORTED)}; got {packed.codec}")
    return ScaledCodes(packed, codec)


# -- one matrix: codes, θ and the straight-through buffer -------------------------------------------

class PVMatrix:
    """A matrix under PV-Tuning: its code groups, its buffer B and the rotation of an incoherence pack."""

    def __init__(self, packed, beam: int | None = None):
        inner, self.rot = split_basis(packed)
        self.packed = packed
        self.groups = code_groups(inner, beam=beam)
        w = self.groups.weight().detach()
        self.buffer = nn.Parameter(w.clone())
        self.rms = float(w.pow(2).mean().sqrt()) or 1.0
        self.start = self.groups.codes.clone()
        self._w = None

    def weight(self) -> torch.Tensor:
        """The forward weight (original basis); keeps the codec-basis tensor to read ∂L/∂W from."""
        w = self.groups.weight()
        if w.requires_grad:
            w.retain_grad()
            self._w = w
        return w if self.rot is None else self.rot.unweight(w)

    def take_grad(self) -> None:
        """Hand ∂L/∂W (codec basis) to the buffer's optimizer."""
        self.buffer.grad = None if self._w is None or self._w.grad is None else self._w.grad.detach().clone()
        self._w = None

    @no_grad
    def v_step(self, tau: float, trust_ratio: float | None = None) -> int:
        """Re-encode the ⌈τ·groups⌉ groups of largest ‖B − W‖² with the codec's search (limited by the
        trust ratio); returns how many groups changed code."""
        g = self.groups
        w = g.weight().detach()
        B = g.groups_of(self.buffer.detach())
        delta = (B - g.groups_of(w)).pow(2).sum(-1)                       # [rows, groups]
        G = delta.shape[1]
        k = min(delta.numel(), max(1, math.ceil(tau * delta.numel())))
        order = torch.topk(delta.reshape(-1), k, sorted=True).indices     # largest δ first
        r, j = order // G, order % G
        values, codes, state = g.search(B[r, j], r, j)
        if trust_ratio is not None:
            change = (values - g.groups_of(w)[r, j]).pow(2).sum(-1)        # in order of δ
            within = change.cumsum(0).sqrt() <= trust_ratio * float(w.norm())
            n = max(1, int(within.long().cumprod(0).sum()))                 # the longest admitted prefix
            r, j, codes = r[:n], j[:n], codes[:n]
            state = None if state is None else state[:n]
        changed = int((g.codes[r, j] != codes).any(-1).sum())
        g.assign(r, j, codes, state)
        return changed

    @no_grad
    def finalize(self):
        inner = self.groups.finalize()
        return inner if self.rot is None else self.rot.wrap(inner)

    def decode(self, packed) -> torch.Tensor:
        """Ŵ of a pack of this matrix in the original basis (what the model evaluates)."""
        from quantatlas.quant.incoherence import decode

        return decode(self.groups.codec, packed)


def trainable_matrices(model, packed: dict, experts=None) -> list[str]:
    """The packed names finetune recovery trains, in the pack's order: the weight of every nn.Linear and,
    with `experts` (the model's models.moe.FusedExpertWeights), every expert matrix of a fused 3-D tensor
    and those blocks' routers; norm vectors an override quantizes, embeddings: kept as packed."""
    mods = dict(model.named_modules())
    moe = set() if experts is None else set(experts.roles) | experts.routers
    return [name for name, pk in packed.items() if len(pk.shape) == 2
            and (name in moe or isinstance(mods.get(name.rsplit(".", 1)[0]), nn.Linear))]


def pv_matrices(model, packed: dict, beam: int | None = None, experts=None) -> dict[str, PVMatrix]:
    """A PVMatrix for every matrix recovery trains (`trainable_matrices`)."""
    return {name: PVMatrix(packed[name], beam) for name in trainable_matrices(model, packed, experts)}


# -- the training loop --------------------------------------------------------------------------------

def pv_tune(model, teacher, matrices: dict[str, PVMatrix], norms: dict, windows: torch.Tensor,
            order: list[int], cfg, progress=None, experts=None) -> dict:
    """Tune `matrices` (name -> PVMatrix; the model's Linear weights and expert matrices) and `norms` against
    `teacher` on the mini-batches `order` of `windows`; the model itself is not changed here. `experts`: the
    model's models.moe.FusedExpertWeights, which the forward's fused parameters are assembled by (None: no
    fused experts among `matrices`). Returns metrics."""
    from torch.func import functional_call

    if not matrices and not norms:
        raise ValueError("recovery: the arm stores no weight matrix (Linear or expert) through a codec: nothing to tune")
    scales = [p for m in matrices.values() for p in m.groups.params] + list(norms.values())
    books = [p for m in matrices.values() for p in m.groups.codebook_params]
    book_lr = cfg.lr if cfg.codebook_lr is None else cfg.codebook_lr
    groups = ([{"params": scales, "lr": cfg.lr}] if scales else []) + \
        ([{"params": books, "lr": book_lr}] if books and book_lr > 0 else [])
    if not groups:
        raise ValueError("recovery.codebook_lr: 0 freezes AQLM's codebooks and its packs store no scale "
                         "(scales: false): the P-step has nothing to tune")
    for p in books:
        p.requires_grad_(book_lr > 0)
    p_opt = torch.optim.Adam(groups)
    v_opt = torch.optim.Adam([{"params": [m.buffer], "lr": cfg.v_lr * m.rms} for m in matrices.values()]) \
        if matrices else None
    tokens = v_steps = changed = 0
    for step, i in enumerate(order):
        x = windows[i * cfg.batch:(i + 1) * cfg.batch]
        tokens += x.numel()
        with torch.no_grad():
            target = teacher(x, use_cache=False).logits
        weights = {name: m.weight() for name, m in matrices.items()}
        params = {**weights, **norms} if experts is None else experts.parameters({**weights, **norms})
        loss = kl_to_teacher(functional_call(model, params, (x,), {"use_cache": False}).logits, target)
        p_opt.zero_grad()
        loss.backward()
        for m in matrices.values():
            m.take_grad()
        p_opt.step()                                   # P: θ and norms, codes fixed
        if v_opt is not None:
            v_opt.step()                               # the straight-through buffer
        if matrices and (step + 1) % cfg.discrete_every == 0:
            v_steps += 1
            changed += sum(m.v_step(cfg.fraction, cfg.trust_ratio) for m in matrices.values())
        if progress:
            progress(1)
    n = sum(m.start.shape[0] * m.start.shape[1] for m in matrices.values())
    moved = sum(int((m.groups.codes != m.start).any(-1).sum()) for m in matrices.values())
    return {"recovery_tokens": float(tokens), "recovery_v_steps": float(v_steps),
            "recovery_codes_moved": moved / max(n, 1),              # share of code groups not at their start
            "recovery_code_changes": changed / max(n, 1)}           # changes summed over V-steps, per group
