"""RoSTE (Wei et al. 2025, "RoSTE: an efficient quantization-aware supervised fine-tuning approach for
LLMs", arXiv 2502.09003) as a recovery method: quantization-aware training through straight-through
estimators on the weights, the activations and the KV cache, after an adaptive choice of rotations.

    recovery: {method: roste, steps: 100, lr: 1e-4, samples: 64, seq_len: 256, batch: 4, rotation: adaptive}

Rotations (the paper's Appendix D, SpinQuant's names). R1, the residual stream, is the arm's own
`hadamard` transform (residual: true, heads: false, no online down): RoSTE keeps it for every layer.
For each decoder layer ℓ it then chooses, as the paper's Algorithm 1 line 5 does, between the identity I
and a random Hadamard H (quant/hadamard.py's RandomizedHadamard, signs from the run seed and (slot, ℓ)):

    vo     R2: the value path per head, merged into the weights: v_proj's rows of each kv head ← H ·,
           o_proj's columns of each query head ← · Hᵀ; the cache then stores H v and o_proj reads H o
    down   R4: down_proj's input, online: W ← W Hᵀ and x ← H x at run time (quant/online.py)

by the lower weight-activation quantization error of the paper's eq. (12), on the fp model (after the
arm's transforms) and the first ROTATION_WINDOWS calibration windows (n of them):

    E_vo(R)   = ‖Q_w(R W_v) − R W_v‖² + ‖Q_w(W_o Rᵀ) − W_o Rᵀ‖²
                + 1/n Σ_j ‖Q_x(R x_o,j) − R x_o,j‖² + 1/n Σ_j ‖Q_v(R v_j) − R v_j‖²
    E_down(R) = ‖Q_w(W_d Rᵀ) − W_d Rᵀ‖² + 1/n Σ_j ‖Q_x(R x_d,j) − R x_d,j‖²

(‖·‖ Frobenius; x_o,j / x_d,j: o_proj / down_proj's inputs on window j; v_j: the values the cache stores;
Q_w: the matrix's own codec (the arm's), Q_x: the arm's `act` quantizer where it quantizes that Linear's
input, Q_v: the arm's `kv.v` codec per token and head (after the cache's own rotation when kv.rotate is
on); an absent quantizer contributes 0). The choice is made once, before training (the paper's lazy
lower level with one outer round). R3, the online Q/K rotation, is the arm's `kv: {rotate: ...}` (one
setting for every layer): per-layer K rotation would need the KV step's cache per layer. `rotation: none`
is plain STE QAT with act/KV in the loop (the paper's "STE" baseline), `rotation: hadamard` rotates every
slot. The chosen rotations are function-preserving in fp (tests/test_roste_qad.py) and are recorded per
layer in the run JSON (`rotations`), with both errors.

Mixture-of-experts layers choose `down` for all their experts at once: one H per layer (the dense slot's
seed, `slot_rotation(seed, "down", ℓ, width)`), as the `hadamard` transform's online down rotates every
expert of a block (quant/online.py; a fused block has one rotation for all its experts), so eq. (12) is
summed over the experts' downs, each on the rows its router sends it (models/moe.py RoutingTap):

    E_down(R) = Σ_e ‖Q_w(W_d,e Rᵀ) − W_d,e Rᵀ‖² + 1/n Σ_j ‖Q_x(R x_e,j) − R x_e,j‖²

(x_e,j = act(gate_e x) ⊙ up_e x on expert e's routed rows of window j, none: 0; Q_w the expert matrix's
own codec, Q_x the act quantizer where it quantizes role expert_down), plus a shared expert's down as a
dense down (role shared_expert_down, every row). If chosen, every expert's down W ← W Hᵀ with x ← H x
online, and a shared expert's down_proj likewise.

Training: every Linear the arm quantizes, and every expert matrix of a fused 3-D expert tensor (the fused
parameter assembled from them each step, models/moe.py `FusedExpertWeights`), gets a latent fp matrix (the
fp model's weight, rotated as chosen) whose forward weight is the codec's fake quantization (its scales
re-fitted each step, as kd_ste with train: weights) through the STE; the arm's activation and KV quantizers
are attached to the student during training with an STE (forward: exactly their fake quantization;
backward: identity), so gradients reach every earlier weight through them. Loss: KL(P_fp ‖ P_q) over the
vocabulary at every calibration position, distillation from the fp teacher as kd_ste: the paper trains on
an SFT dataset with its cross-entropy loss (there is no fine-tuning task here; the teacher is the model
before quantization).
At the end each latent is encoded by its codec and the model's weight set to decode(pack); the act/KV
hooks are removed again (their own steps attach them for evaluation); the online down rotations stay.
"""
from __future__ import annotations

import copy
import time

from quantatlas._lazy import nn, no_grad, torch
from quantatlas.context import RunContext
from quantatlas.quant.pv_tuning import codec_of_pack, kl_to_teacher

#: calibration windows the rotation errors are measured on (the first of the seeded training pool)
ROTATION_WINDOWS = 8
#: the per-layer rotation slots RoSTE chooses
SLOTS = ("vo", "down")


# -- spec-time checks (no torch) --------------------------------------------------------------------

def arm_conflicts(arm) -> str | None:
    """Why an arm cannot run roste, or None (called when the spec is read, before any compute)."""
    for t in getattr(arm, "transforms", None) or []:
        if getattr(t, "name", None) == "hadamard" and (getattr(t, "heads", False) or "down" in getattr(t, "online", [])):
            return ("recovery: roste chooses each layer's value-path (heads) and down_proj rotation itself: use "
                    "transforms: [{hadamard: {heads: false, online: []}}] (the residual rotation R1) or none")
    act = getattr(arm, "act", None)
    if act is not None and (act.static or act.scheme == "llamacpp_cpu" or act.hadamard):
        return ("recovery: roste trains with the arm's activation quantizer in the loop, which must be dynamic "
                "and unrotated: act.static, act.scheme llamacpp_cpu and act.hadamard are not supported")
    kv = getattr(arm, "kv", None)
    if kv is not None and kv.v is not None and kv.v_granularity != "token":
        return "recovery: roste measures the V cache's error per token and head: kv.v_granularity must be token"
    if getattr(getattr(arm, "solver_options", None), "incoherence", False):
        return "recovery: roste trains plain packs; solver incoherence stores a rotated matrix"
    return None


# -- the pieces -----------------------------------------------------------------------------------

def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in the forward (exactly: x − x.detach() is 0), the identity gradient to x in the backward."""
    return q.to(x.dtype) + (x - x.detach()) if x.requires_grad else q.to(x.dtype)


def ste_codec(codec):
    """A copy of `codec` whose `fake_quantize` and `quantize` pass gradients straight through (the act
    and KV hooks call these on tensors that carry gradients during training; inside the codec the
    input is detached, so the STE term appears once)."""
    from quantatlas.quant.codecs.base import Quantized

    if codec is None:
        return None
    fake, quantize = codec.fake_quantize, codec.quantize
    out = copy.copy(codec)
    out.fake_quantize = lambda w, importance=None: ste(w.float(), fake(w, importance))
    out.quantize = lambda w, params, col=0: (lambda q: Quantized(ste(w.float(), q.values), q.codes))(
        quantize(w, params, col))
    return out


def slot_rotation(seed: int, slot: str, layer: int, size: int):
    """The random Hadamard H of `slot` in decoder layer `layer` (None: no Hadamard matrix of that order)."""
    from quantatlas.quant.hadamard import RandomizedHadamard, has_hadamard

    if not has_hadamard(size):
        return None
    return RandomizedHadamard(size, RunContext(seed).sub_seed("named", "roste", slot, layer))


def rotate_value_rows(w: torch.Tensor, h, n_kv: int, head_dim: int) -> torch.Tensor:
    """v_proj [n_kv·hd, in]: each kv head's rows ← H ·."""
    return h.rotate(w.reshape(n_kv, head_dim, -1).transpose(1, 2)).transpose(1, 2).reshape(w.shape)


def rotate_head_columns(w: torch.Tensor, h, n_heads: int, head_dim: int) -> torch.Tensor:
    """o_proj [out, n_heads·hd]: each query head's columns ← · Hᵀ."""
    return h.rotate(w.reshape(-1, n_heads, head_dim)).reshape(w.shape)


def rotate_heads(x: torch.Tensor, h, head_dim: int) -> torch.Tensor:
    """Activations [..., heads·hd]: each head's values ← H ·."""
    return h.rotate(x.reshape(*x.shape[:-1], -1, head_dim)).reshape(x.shape)


class Quantizers:
    """The arm's quantizers as RoSTE's error (eq. 12) sees them: each matrix's codec, the activation
    quantizer of each hooked Linear, the V cache codec."""

    def __init__(self, packed: dict, act_cfg, kv_cfg, seed: int):
        from quantatlas.quant.act import ActivationQuantizer
        from quantatlas.quant.kv import KVCacheQuantizer

        self.codecs = {name: codec_of_pack(p) for name, p in packed.items()}
        self.act_cfg, self.kv_cfg, self.seed = act_cfg, kv_cfg, seed
        self.act = None if act_cfg is None else ActivationQuantizer(act_cfg, seed).codec
        self.v = None if kv_cfg is None else KVCacheQuantizer(kv_cfg, seed).v

    def weight_error(self, name: str, w: torch.Tensor) -> float:
        codec = self.codecs.get(name)
        return 0.0 if codec is None else float(((codec.fake_quantize(w) - w.float()) ** 2).sum())

    def acts_on(self, role: str, layer: int) -> bool:
        c = self.act_cfg
        return self.act is not None and (c.roles is None or role in c.roles) and (c.layers is None or layer in c.layers)

    def act_error(self, xs: list, role: str, layer: int, n: int | None = None) -> float:
        """1/n Σ_j ‖Q_x(x_j) − x_j‖² over the windows' inputs x_j [tokens, width]; n: the windows, len(xs)
        unless given (a routed expert's xs leave out the windows that send it no row: they add 0)."""
        from quantatlas.quant.act import fake_quantize_rows

        if not xs or not self.acts_on(role, layer):
            return 0.0
        width = xs[0].shape[-1]
        group = self.act.group_of(width) if hasattr(self.act, "group_of") else width
        return sum(float(((fake_quantize_rows(x, self.act, group, self.act_cfg.clip_ratio) - x) ** 2).sum())
                   for x in xs) / (len(xs) if n is None else n)

    def v_error(self, vs: list, head_dim: int) -> float:
        """1/n Σ_j ‖Q_v(v_j) − v_j‖² over the values the cache stores, [tokens, kv_heads·hd] per window."""
        from quantatlas.quant.kv import AUTO_ROTATE_MULTIPLE, fake_quantize_heads

        if not vs or self.v is None:
            return 0.0
        r = self.kv_cfg.rotate
        cache_rotation = None
        if r is True or (r == "auto" and head_dim % AUTO_ROTATE_MULTIPLE == 0):
            from quantatlas.quant.hadamard import RandomizedHadamard

            # the cache's own rotation, as quant/kv.py derives it (rotation_seed + the run seed)
            cache_rotation = RandomizedHadamard(head_dim, RunContext(self.seed).sub_seed("offset", self.kv_cfg.rotation_seed))
        total = 0.0
        for v in vs:
            rows = v.reshape(-1, head_dim).float()
            if cache_rotation is not None:
                rows = cache_rotation.rotate(rows)
            total += float(((fake_quantize_heads(rows, self.v) - rows) ** 2).sum())
        return total / len(vs)


@no_grad
def capture(teacher, windows: torch.Tensor) -> dict[int, dict[str, list]]:
    """Per decoder layer, per window: o_proj's input, down_proj's input and v_proj's output (the values
    the cache stores), each [tokens, width], from the fp model. An MoE layer has, in place of "down",
    ("expert_down", e): expert e's down input on the rows routed to it, for the windows that route it
    any (models/moe.py), and "shared_expert_down": a shared expert's down input on every row."""
    from quantatlas.models.layout import layout
    from quantatlas.models.moe import BoundMoE, RoutingTap

    seen: dict[int, dict[str, list]] = {}
    handles = []

    def keep_experts(layer, bound):
        def fn(routing):
            for e in range(bound.moe.n_experts):
                tok, _ = routing.rows_of(e)
                if tok.numel():
                    h = bound.hidden(e, routing.x[tok])
                    seen.setdefault(layer, {}).setdefault(("expert_down", e), []).append(h.detach().float())
        return fn

    def keep(layer, what, output):
        def hook(module, args, out=None):
            x = out if output else args[0]
            seen.setdefault(layer, {}).setdefault(what, []).append(x.detach().float().reshape(-1, x.shape[-1]))
        return hook

    for lay in layout(teacher).layers:
        o, down, v = lay.module("o"), lay.module("down"), lay.module("v")
        if o is None or (down is None and lay.moe is None) or v is None:
            raise ValueError(f"recovery.method: roste needs v/o/down projections; decoder layer {lay.index} of "
                             f"{type(teacher).__name__} has not all of them (a fused qkv or gate_up model)")
        if any(key.endswith("v_norm") for key in lay.norms):
            raise ValueError(f"recovery.method: roste's value rotation needs v_proj's output to be the cached "
                             f"value; layer {lay.index} normalises it (v_norm)")
        handles.append(o.register_forward_pre_hook(keep(lay.index, "o", False)))
        if down is not None:
            handles.append(down.register_forward_pre_hook(keep(lay.index, "down", False)))
        else:                   # an MoE layer: each expert's routed rows (a RoutingTap has .remove too)
            bound = BoundMoE(lay.moe)
            handles.append(RoutingTap(bound, keep_experts(lay.index, bound)))
            shared = lay.moe.shared.get("shared_expert_down")
            if shared is not None:
                handles.append(shared.module.register_forward_pre_hook(keep(lay.index, "shared_expert_down", False)))
        handles.append(v.register_forward_hook(lambda m, a, out, f=keep(lay.index, "v", True): f(m, a, out)))
    try:
        for i in range(windows.shape[0]):
            teacher(windows[i:i + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def rotation_errors(teacher, quantizers: Quantizers, windows: torch.Tensor, seed: int) -> dict:
    """{layer: {slot: {"identity": E(I), "hadamard": E(H) or None}}} by eq. (12) (module docstring)."""
    from quantatlas.models.layout import layout

    acts = capture(teacher, windows[:ROTATION_WINDOWS])
    n = int(min(ROTATION_WINDOWS, windows.shape[0]))
    out = {}
    for lay in layout(teacher).layers:
        li, hd, nh, nkv = lay.index, lay.head_dim, lay.n_heads, lay.n_kv_heads
        mods = {r: lay.matrices[r] for r in ("v", "o", "down") if r in lay.matrices}
        name = {r: t.name + ".weight" for r, t in mods.items()}
        w = {r: t.module.weight.detach().float() for r, t in mods.items()}
        a = acts.get(li, {})
        errors = {}
        h = slot_rotation(seed, "vo", li, hd)
        errors["vo"] = {"identity": quantizers.weight_error(name["v"], w["v"]) + quantizers.weight_error(name["o"], w["o"])
                        + quantizers.act_error(a.get("o", []), "o", li) + quantizers.v_error(a.get("v", []), hd),
                        "hadamard": None}
        if h is not None:
            errors["vo"]["hadamard"] = (
                quantizers.weight_error(name["v"], rotate_value_rows(w["v"], h, nkv, hd))
                + quantizers.weight_error(name["o"], rotate_head_columns(w["o"], h, nh, hd))
                + quantizers.act_error([rotate_heads(x, h, hd) for x in a.get("o", [])], "o", li)
                + quantizers.v_error([rotate_heads(v, h, hd) for v in a.get("v", [])], hd))
        if "down" not in w:     # an MoE layer: eq. (12) summed over its experts' downs (module docstring)
            errors["down"] = expert_down_errors(lay, quantizers, a, n, seed)
            out[li] = errors
            continue
        h = slot_rotation(seed, "down", li, w["down"].shape[1])
        errors["down"] = {"identity": quantizers.weight_error(name["down"], w["down"])
                          + quantizers.act_error(a.get("down", []), "down", li), "hadamard": None}
        if h is not None:
            errors["down"]["hadamard"] = (quantizers.weight_error(name["down"], h.rotate(w["down"]))
                                          + quantizers.act_error([h.rotate(x) for x in a.get("down", [])], "down", li))
        out[li] = errors
    return out


def expert_down_matrices(lay) -> list[tuple[str, str, torch.Tensor]]:
    """(packed name, act role, current [out, in] weight) of every down of an MoE layer: each routed
    expert's (its role expert_down; a view of the fused tensor or the Linear's weight), then a shared
    expert's (a dense down on every row)."""
    from quantatlas.models.moe import BoundMoE

    moe, bound = lay.moe, BoundMoE(lay.moe)
    out = [(moe.experts[e]["expert_down"].name + ".weight", "expert_down", bound.weight(e, "expert_down"))
           for e in range(moe.n_experts)]
    shared = moe.shared.get("shared_expert_down")
    if shared is not None:
        out.append((shared.name + ".weight", "shared_expert_down", shared.module.weight))
    return out


def moe_down_rotation(seed: int, layer: int, width: int):
    """An MoE layer's down R: the dense slot's Hadamard of that width (one for all its experts)."""
    return slot_rotation(seed, "down", layer, width)


def expert_down_errors(lay, quantizers: Quantizers, acts: dict, n: int, seed: int) -> dict:
    """E_down(I) and E_down(H) of an MoE layer: Σ over its experts e (and a shared expert) of
    ‖Q_w(W_e Rᵀ) − W_e Rᵀ‖² + 1/n Σ_j ‖Q_x(R x_e,j) − R x_e,j‖², x_e,j: e's down input on its routed rows
    of window j (`capture`); H: None where a width has no Hadamard."""
    li = lay.index
    errors = {"identity": 0.0, "hadamard": 0.0}
    for e, (name, role, weight) in enumerate(expert_down_matrices(lay)):
        w = weight.detach().float()
        xs = acts.get(("expert_down", e) if role == "expert_down" else role, [])
        errors["identity"] += quantizers.weight_error(name, w) + quantizers.act_error(xs, role, li, n)
        h = moe_down_rotation(seed, li, w.shape[1])
        if h is None or errors["hadamard"] is None:
            errors["hadamard"] = None
            continue
        errors["hadamard"] += (quantizers.weight_error(name, h.rotate(w))
                               + quantizers.act_error([h.rotate(x) for x in xs], role, li, n))
    return errors


def choose(errors: dict, mode: str) -> dict[int, dict[str, bool]]:
    """{layer: {slot: rotate?}}: adaptive takes H where its error is lower (I on a tie or without H)."""
    def pick(e):
        if e["hadamard"] is None or mode == "none":
            return False
        return mode == "hadamard" or e["hadamard"] < e["identity"]
    return {li: {slot: pick(e) for slot, e in slots.items()} for li, slots in errors.items()}


def rotated_weights(model, chosen: dict, seed: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` (name -> fp matrix of `model`'s Linears and fused experts' matrices) with the chosen
    rotations folded in: v/o per head (vo), down's columns W Hᵀ (down, on an MoE layer every expert's and a
    shared expert's down that `weights` holds; its input is rotated online by `attach_down_rotations`)."""
    from quantatlas.models.layout import layout

    out = dict(weights)
    for lay in layout(model).layers:
        pick = chosen.get(lay.index, {})
        hd = lay.head_dim
        name = {r: lay.matrices[r].name + ".weight" for r in ("v", "o", "down") if r in lay.matrices}
        if pick.get("vo"):
            h = slot_rotation(seed, "vo", lay.index, hd)
            out[name["v"]] = rotate_value_rows(out[name["v"]], h, lay.n_kv_heads, hd)
            out[name["o"]] = rotate_head_columns(out[name["o"]], h, lay.n_heads, hd)
        if pick.get("down") and lay.moe is not None:
            for n, _, _ in expert_down_matrices(lay):
                if n in out:
                    out[n] = moe_down_rotation(seed, lay.index, out[n].shape[1]).rotate(out[n])
        elif pick.get("down"):
            out[name["down"]] = slot_rotation(seed, "down", lay.index, out[name["down"]].shape[1]).rotate(out[name["down"]])
    return out


def attach_down_rotations(model, chosen: dict, seed: int) -> None:
    """The online x ← H x before each down_proj whose rotation was chosen (its weight is folded too); on
    an MoE layer before every expert's down (quant/online.py) and a shared expert's down_proj."""
    from quantatlas.models.layout import layout
    from quantatlas.models.moe import BoundMoE
    from quantatlas.quant.online import (OnlineRotation, attach_expert_down_rotation, attach_online_rotation,
                                         has_online_rotation)

    for lay in layout(model).layers:
        if chosen.get(lay.index, {}).get("down") and lay.moe is not None:
            where = f"recovery.method: roste: layer {lay.index}: "
            bound = BoundMoE(lay.moe)
            if lay.moe.n_experts:
                width = bound.weight(0, "expert_down").shape[1]
                attach_expert_down_rotation(bound, OnlineRotation(moe_down_rotation(seed, lay.index, width)), where)
            shared = lay.moe.shared.get("shared_expert_down")
            if shared is not None:
                if has_online_rotation(shared.module):
                    raise ValueError(f"{where}the shared expert's down_proj already rotates its input online")
                attach_online_rotation(shared.module, OnlineRotation(
                    moe_down_rotation(seed, lay.index, shared.module.in_features)))
        elif chosen.get(lay.index, {}).get("down"):
            down = lay.module("down")
            if has_online_rotation(down):
                raise ValueError(f"recovery.method: roste: layer {lay.index} down_proj already rotates its input "
                                 "online (the hadamard transform's online: [down]); leave it out")
            attach_online_rotation(down, OnlineRotation(slot_rotation(seed, "down", lay.index, down.in_features)))


@no_grad
def rotate_model(model, chosen: dict, seed: int) -> None:
    """Apply the chosen rotations to an fp model in place (its function is unchanged up to fp rounding)."""
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.dim() == 2]
    new = rotated_weights(model, chosen, seed, {n: params[n].detach().double() for n in names})
    attach_down_rotations(model, chosen, seed)   # rotates down's weight itself: set the folded ones after
    for n in names:
        params[n].copy_(new[n].to(params[n].dtype))


class QuantizedLoop:
    """The arm's activation and KV quantizers attached to the student with straight-through gradients."""

    def __init__(self, act_cfg, kv_cfg, seed: int):
        self.act_cfg, self.kv_cfg, self.seed = act_cfg, kv_cfg, seed
        self.act = None
        self.attn = None

    def attach(self, model) -> None:
        from quantatlas.quant.act import ActivationQuantizer
        from quantatlas.quant.kv import KVCacheQuantizer

        if self.kv_cfg is not None:
            kv = KVCacheQuantizer(self.kv_cfg, self.seed)
            kv.k, kv.v = ste_codec(kv.k), ste_codec(kv.v)
            self.attn = getattr(model.config, "_attn_implementation", None)
            kv.attach(model)
        if self.act_cfg is not None:
            self.act = ActivationQuantizer(self.act_cfg, self.seed)
            self.act.codec = ste_codec(self.act.codec)
            self.act.attach(model)

    def detach(self, model) -> None:
        if self.act is not None:
            self.act.detach()
            self.act = None
        if self.kv_cfg is not None:
            model.config._attn_implementation = self.attn   # the KV step attaches its own cache later


class RoSTE:
    """Choose the rotations, then QAT with act/KV in the loop; `run` mirrors recovery.Recovery.run."""

    def __init__(self, cfg, seed: int, act_cfg=None, kv_cfg=None):
        self.cfg, self.seed, self.act_cfg, self.kv_cfg = cfg, int(seed), act_cfg, kv_cfg
        self.errors: dict = {}
        self.chosen: dict = {}
        self.latents: dict[str, nn.Parameter] = {}

    def _matrices(self, model, packed: dict, experts) -> dict:
        from quantatlas.quant.codecs.base import Packed
        from quantatlas.quant.pv_tuning import trainable_matrices

        out = {}
        for name in trainable_matrices(model, packed, experts):   # embeddings, vectors: kept as packed
            pk = packed[name]
            if type(pk) is not Packed:
                raise ValueError(f"recovery.method: roste trains plain packs; {name} is a {type(pk).__name__}")
            out[name] = pk
        if not out:
            raise ValueError("recovery: the arm stores no weight matrix (Linear or expert) through a codec: nothing to tune")
        return out

    def run(self, model, teacher, packed: dict, windows: torch.Tensor, progress=None) -> tuple[dict, dict, dict]:
        """Tune `model` in place; returns (packed, numeric metrics, report: rotations and errors per layer)."""
        from torch.func import functional_call

        from quantatlas.models.moe import FusedExpertWeights
        from quantatlas.quant.qad import bind_stored_tensor_scale
        from quantatlas.quant.recovery import batch_order, mean_kl

        cfg = self.cfg
        if windows.shape[0] != cfg.samples:
            raise ValueError(f"recovery: {windows.shape[0]} windows, expected samples={cfg.samples}")
        for p in list(model.parameters()) + list(teacher.parameters()):
            p.requires_grad_(False)
        t0 = time.process_time()
        experts = FusedExpertWeights(model)   # fused 3-D expert tensors: a latent per expert, assembled per step
        mats = self._matrices(model, packed, experts)
        codecs = {n: bind_stored_tensor_scale(codec_of_pack(pk), pk) for n, pk in mats.items()}
        quantizers = Quantizers(mats, self.act_cfg, self.kv_cfg, self.seed)
        self.errors = rotation_errors(teacher, quantizers, windows, self.seed)
        self.chosen = choose(self.errors, cfg.rotation)

        loop = QuantizedLoop(self.act_cfg, self.kv_cfg, self.seed)
        probe = windows[:32]   # the loss before and after (act/KV quantized), on up to 32 training windows
        loop.attach(model)
        try:
            before = mean_kl(model, teacher, probe)
        finally:
            loop.detach(model)
        fp = dict(teacher.named_parameters())
        fp_experts = FusedExpertWeights(teacher)
        start = rotated_weights(model, self.chosen, self.seed,
                                {n: (fp_experts.matrix(n) if n in experts else fp[n]).detach().double() for n in mats})
        # the online down rotations go first: an activation hook registered later sees the rotated input
        attach_down_rotations(model, self.chosen, self.seed)
        loop.attach(model)
        try:
            self.latents = {n: nn.Parameter(start[n].float().clone()) for n in mats}
            opt = torch.optim.Adam(list(self.latents.values()), lr=cfg.lr)
            tokens = 0
            for i in batch_order(cfg, self.seed):
                x = windows[i * cfg.batch:(i + 1) * cfg.batch]
                tokens += x.numel()
                with torch.no_grad():
                    target = teacher(x, use_cache=False).logits
                weights = {n: ste(lat, codecs[n].fake_quantize(lat.detach())) for n, lat in self.latents.items()}
                loss = kl_to_teacher(functional_call(model, experts.parameters(weights), (x,),
                                                     {"use_cache": False}).logits, target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if progress:
                    progress(1)
            new = self._finalize(model, codecs, experts)
            after = mean_kl(model, teacher, probe)
        finally:
            loop.detach(model)
        n_layers = max(len(self.chosen), 1)
        info = {"recovery_cpu_s": time.process_time() - t0, "recovery_train_kl_before": before,
                "recovery_train_kl_after": after, "recovery_tokens": tokens,
                "recovery_rotated_vo": sum(c["vo"] for c in self.chosen.values()) / n_layers,
                "recovery_rotated_down": sum(c["down"] for c in self.chosen.values()) / n_layers}
        report = {"rule": "eq. 12: weight + activation (+ V cache) quantization error, lower of identity / hadamard",
                  "mode": cfg.rotation, "windows": int(min(ROTATION_WINDOWS, windows.shape[0])),
                  "layers": {str(li): {slot: {"rotation": "hadamard" if self.chosen[li][slot] else "identity",
                                              **self.errors[li][slot]} for slot in SLOTS}
                             for li in sorted(self.errors)}}
        return {**packed, **new}, info, report

    @no_grad
    def _finalize(self, model, codecs: dict, experts) -> dict:
        params = dict(model.named_parameters())
        new = {}
        for n, lat in self.latents.items():
            new[n] = codecs[n].encode(lat.detach())
            w = experts.matrix(n) if n in experts else params[n]   # an expert's matrix: a view of the fused tensor
            w.copy_(codecs[n].decode(new[n]).to(w.dtype).reshape(w.shape))
        return new


def recover_roste(model, teacher, packed: dict, cfg, seed: int, calib_stream, eval_stream, eval_used: int,
                  act_cfg=None, kv_cfg=None, progress=None) -> tuple[dict, dict, dict]:
    """recovery.recover for roste: the seeded windows (checked disjoint from the eval tokens), then
    `RoSTE.run`; returns (re-packed tensors, metrics, rotation report)."""
    from quantatlas.quant.recovery import check_disjoint, draw_windows

    windows, starts = draw_windows(calib_stream, cfg.samples, cfg.seq_len, seed)
    check_disjoint(calib_stream, starts, cfg.seq_len, eval_stream, eval_used)
    dev = next(model.parameters()).device
    return RoSTE(cfg, seed, act_cfg, kv_cfg).run(model, teacher, packed, torch.from_numpy(windows).to(dev), progress)
