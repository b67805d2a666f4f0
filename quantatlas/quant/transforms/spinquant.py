"""SpinQuant (Liu et al. 2024): QuaRot's rotations with R1 and R2 learned for the arm's quantizers.

Rotations (the places of `hadamard`, rotation.py; the norm gains are folded into the linears first):

R1  the residual stream, d×d: readers W ← W R1ᵀ (q, k, v, gate, up, head, embedding rows), writers
    W ← R1 W, b ← R1 b (o, down). Merged into the weights; learned.
R2  per layer, head_dim×head_dim: v_proj's rows of every KV head ← R2 ·, o_proj's columns of every
    query head ← · R2ᵀ (softmax mixes tokens, not channels). Merged into the weights; learned.
R3  a Hadamard on Q and K after RoPE: q·k is unchanged, so only the KV quantizer sees it. That is
    the arm's `kv: {rotate: true}` (quant/kv.py stores Q·k, and Q·v, reading back Qᵀ·decode): it is
    part of the KV quantizer, in the loop below as the arm writes it.
R4  an online Hadamard before down_proj (`online: [down]`, as hadamard's; `[o, down]` adds QuaRot's
    one before o_proj): W ← W Qᵀ and the input is rotated at run time (quant/online.py).

Mixture-of-experts layers (as `hadamard` folds them): R1's readers of post_attention_layernorm are the
router, every expert's gate and up and a shared expert's gate, up and router; its writers every expert's
down and a shared expert's down; R4 is one online Hadamard per layer before its experts' down (and one
before a shared expert's down). In the loop the weight quantizer goes over each expert matrix and a
shared expert's (the routers stay fp), the act quantizer over each expert's inputs (`MoEWeights`).

R1 and R2 start at hadamard's seeded randomized Hadamards (the same seeds), so `steps: 0` is the
`hadamard` transform exactly, and training starts from QuaRot. Then `steps` of Cayley SGD on the
Stiefel manifold (quant/cayley.py, SpinQuant's optimizer; the step size decays along a cosine to 0,
as in SpinQuant's training) minimise

    L(R1, R2) = mean over the tokens of the calibration windows of KL(P_fp ‖ P_q)

the divergence the atlas measures, from the fp model before the transform (P_fp, computed once) to
the model with the current rotations and the arm's quantizers in the loop (P_q). SpinQuant's paper
trains on the next token's cross-entropy; the KL to the fp model is zero at fp, so it measures only
what quantization costs. The quantizers, each with a straight-through estimator (forward: the
quantized value; backward: identity, y = x + (fq(x) − x).detach()):

  weights      the arm's codec, round to nearest (`codec.fake_quantize`) on every decoder Linear's
               rotated weight (q, k, v, o, gate, up, down; the head and embedding stay fp, as the
               arm's recipe leaves them by default; per-role overrides are not in the loop);
  activations  the arm's `act` quantizer (quant/act.py), hooked on the Linears as the act step hooks it;
  KV cache     the arm's `kv` quantizer (quant/kv.py) in the attention function, `rotate` (R3) included.

`samples` windows of `seq_len` tokens are taken from the arm's calibration draw; each step uses
`batch` of them (a seeded shuffle). When training ends the final R1, R2 are folded into the fp
weights in float64 (the model's function is unchanged up to rounding), the online Hadamards stay as
hooks, and the arm's solver (GPTQ, RTN) quantizes the rotated weights as after `hadamard`.

Defaults, sized on the reference model (hidden 256, 6 layers) at W4A4KV4 and W3, seed 0, KL on 16
held-out calibration windows: 100 steps of batch 4 × 256 tokens from 32 windows take ~50 CPU-seconds
(one thread). SpinQuant's lr 1.5 without momentum moves R by ~0.003 rad a step here (the KL of a
small model is small, so are its gradients) and changes nothing; lr 50 with momentum 0.9 gave the
lowest held-out KL (lr 200 overshoots). The gain at W4A4KV4 comes from R2 (learning R1 alone changed
nothing): the largest parts of the damage, K and the down_proj input, are out of R1's and R2's reach.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal

from pydantic import Field, model_validator

from quantatlas._lazy import nn, no_grad, torch
from quantatlas.context import RunContext
from quantatlas.quant.config import TransformConfig
from quantatlas.quant.transforms import _llama
from quantatlas.quant.transforms.base import Transform, check_calib


class SpinQuantConfig(TransformConfig):
    name = "spinquant"
    seeded = True
    #: which rotations are trained (the others stay at their Hadamard start)
    learn: list[Literal["r1", "r2"]] = ["r1", "r2"]
    #: online Hadamards: R4 before down_proj; "o" adds QuaRot's before o_proj
    online: list[Literal["o", "down"]] = ["down"]
    #: Cayley SGD (defaults sized on the reference model: module docstring)
    steps: int = Field(100, ge=0)
    lr: float = Field(50.0, gt=0, allow_inf_nan=False)
    momentum: float = Field(0.9, ge=0, lt=1, allow_inf_nan=False)
    #: calibration windows trained on (the first of the arm's draw), their length, and per step
    samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=2)
    batch: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _consistent(self):
        if self.batch > self.samples:
            raise ValueError(f"batch ({self.batch}) is larger than samples ({self.samples})")
        if not self.learn and self.steps:
            raise ValueError("learn is empty: nothing to train (steps: 0, or the hadamard transform, is that)")
        if len(set(self.learn)) != len(self.learn) or len(set(self.online)) != len(self.online):
            raise ValueError("learn and online list each rotation once")
        return self

    def build(self):
        return SpinQuant(self)


class StraightThrough:
    """A codec whose `fake_quantize` passes gradients straight through: x + (fq(x) − x).detach().
    Everything else is the wrapped codec's."""

    def __init__(self, codec):
        self.codec = codec

    def fake_quantize(self, x, importance=None):
        return x + (self.codec.fake_quantize(x, importance).to(x.dtype) - x).detach()

    def __getattr__(self, name):
        if name == "codec":     # not set yet (a copy being built): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.codec, name)


class RotatedWeights:
    """The model's weights as a function of R1 and the R2s: the fp weights after the norm gains are
    folded (`base`, float64) rotated as the module docstring says, online Hadamards folded in."""

    def __init__(self, model, layers: list[_llama.Layer], online: dict):
        names = {id(m): n for n, m in model.named_modules()}
        # online: id(linear) or id(an MoE layer's BoundMoE: its experts' down) -> RandomizedHadamard
        self.layers, self.online = layers, online
        self.embed = names[id(_llama.embedding(model))] + ".weight"
        self.head = names[id(_llama.head(model))] + ".weight"
        self.linears = [{role: names[id(lin)] for role, lin in layer.linears().items()} for layer in layers]
        self.experts = [None if layer.moe is None else MoEWeights(layer.moe, names) for layer in layers]
        params = dict(model.named_parameters())
        wanted = {self.embed, self.head} | {f"{n}.{p}" for lin in self.linears for n in lin.values()
                                            for p in ("weight", "bias")}
        wanted |= {k for moe in self.experts if moe is not None for k in moe.names()}
        self.base = {k: params[k].detach().double().clone() for k in wanted if k in params}
        self.base_f32 = {k: v.float() for k, v in self.base.items()}
        self.dtypes = {k: params[k].dtype for k in self.base}

    def weights(self, r1, r2s, quantize=None) -> dict:
        """{parameter name: tensor} for rotations r1 [d, d] and r2s [head_dim, head_dim] per layer, in
        their dtype (float32: training, differentiable; float64: the final fold); `quantize(w)` is
        applied to each decoder Linear's weight (the in-loop weight quantizer)."""
        base = self.base_f32 if r1.dtype == torch.float32 else self.base
        out = {self.embed: base[self.embed] @ r1.T, self.head: base[self.head] @ r1.T}
        for layer, names, r2, moe in zip(self.layers, self.linears, r2s, self.experts):
            hd, n_kv, n_heads = layer.head_dim, layer.n_kv_heads, layer.n_heads
            if moe is not None:
                out.update(moe.weights(base, r1, self.online, quantize))
            w = {}
            for role in ("q", "k", "gate", "up"):
                if role in names:
                    w[role] = base[names[role] + ".weight"] @ r1.T
            v = base[names["v"] + ".weight"] @ r1.T                               # [n_kv·hd, d]
            w["v"] = torch.einsum("ij,hjd->hid", r2, v.reshape(n_kv, hd, -1)).reshape(v.shape)
            o = r1 @ base[names["o"] + ".weight"]                                 # [d, n_heads·hd]
            w["o"] = (o.reshape(-1, n_heads, hd) @ r2.T).reshape(o.shape)
            if "down" in names:
                w["down"] = r1 @ base[names["down"] + ".weight"]
            for role in ("o", "down"):
                q = self.online.get(id(getattr(layer, role))) if role in w else None
                if q is not None:
                    w[role] = q.rotate(w[role])                                   # W ← W Qᵀ
            for role, weight in w.items():
                out[names[role] + ".weight"] = weight if quantize is None else quantize(weight)
            for role, rotate in (("v", lambda b: (b.reshape(n_kv, hd) @ r2.T).reshape(-1)),
                                 ("o", lambda b: r1 @ b), ("down", lambda b: r1 @ b)):
                key = names.get(role, "") + ".bias"
                if key in base:
                    out[key] = rotate(base[key])
        return {k: v.to(self.dtypes[k]) for k, v in out.items()}


class MoEWeights:
    """An MoE layer's weights as functions of R1 (`RotatedWeights`): the router, every expert's gate and up and
    a shared expert's gate, up and router read the stream (W ← W R1ᵀ), every expert's down and a shared
    expert's down write it (W ← R1 W), then the online R4 of the experts' down (one per layer) and of a shared
    expert's down (W ← W Qᵀ). `quantize` goes over each expert matrix [out, in] on its own, as the weight step
    quantizes them; the routers stay fp. Fused experts are functions of their 3-D parameters (as the layout
    slices them: `quant.online.FusedMatrices`), a ModuleList's of each Linear's weight."""

    def __init__(self, bound, names: dict):
        from quantatlas.quant.online import FusedMatrices

        moe = bound.moe
        self.bound = bound
        self.fused = FusedMatrices.of(moe) if moe.fused else None
        if moe.fused:
            prefix = names[id(bound.experts)]
            params = {p for _, p, _, _ in self.fused.where}
            self.params = {p: f"{prefix}.{p}" for p in params}
        else:   # expert e's Linear of each role
            self.list = [{role: names[id(t.module)] + ".weight" for role, t in roles.items()} for roles in moe.experts]
        self.readers = [names[id(bound.router)] + ".weight"]
        self.shared = {r: names[id(t.module)] + ".weight" for r, t in moe.shared.items()}
        self.shared_down = moe.shared["shared_expert_down"].module if "shared_expert_down" in moe.shared else None

    def names(self) -> list[str]:
        out = self.readers + list(self.shared.values())
        return out + (list(self.params.values()) if self.fused else [n for e in self.list for n in e.values()])

    def weights(self, base: dict, r1, online: dict, quantize=None) -> dict:
        fq = (lambda w: w) if quantize is None else quantize
        q = online.get(id(self.bound))
        out = {n: base[n] @ r1.T for n in self.readers}       # the router, fp
        for role, n in self.shared.items():
            if role == "shared_expert_down":
                w = r1 @ base[n]
                rot = online.get(id(self.shared_down))
                out[n] = fq(w if rot is None else rot.rotate(w))
            else:
                w = base[n] @ r1.T
                out[n] = w if role == "shared_router" else fq(w)
        if self.fused is None:
            for roles in self.list:
                for role, n in roles.items():
                    w = r1 @ base[n] if role == "expert_down" else base[n] @ r1.T
                    out[n] = fq(w if q is None or role != "expert_down" else q.rotate(w))
            return out
        for param, n in self.params.items():
            roles = [(role, rows, t) for role, p, rows, t in self.fused.where if p == param]
            p = base[n]                                          # [E, out, in], or [E, in, out] (transposed)
            if any(role == "expert_down" for role, _, _ in roles):   # a writer: W ← R1 W, then W ← W Qᵀ
                transposed = roles[0][2]
                p = p @ r1.T if transposed else r1 @ p
                if q is not None:
                    p = q.rotate(p.transpose(-1, -2)).transpose(-1, -2) if transposed else q.rotate(p)
            else:                                                # readers: W ← W R1ᵀ
                p = r1 @ p if roles[0][2] else p @ r1.T
            out[n] = p if quantize is None else _each_matrix(p, roles, quantize)
        return out


def _each_matrix(p, roles, fn):
    """A fused 3-D parameter with `fn` applied to each expert's [out, in] matrix of each role (rows, transposed)."""
    from quantatlas.models.moe import fused_matrix

    experts = []
    for e in range(p.shape[0]):
        pe = p[e].clone()
        for _, rows, transposed in roles:
            w = fn(fused_matrix(p[e], rows, transposed))
            if transposed:      # slice assignment, not copy_ into fused_matrix(pe, ...): the same gradient bits
                pe[:, rows] = w.t()
            else:
                pe[rows] = w
        experts.append(pe)
    return torch.stack(experts)


class SpinQuant(Transform):
    name = "spinquant"

    def __init__(self, cfg: SpinQuantConfig):
        super().__init__(cfg)
        self.codec = None          # the arm's weight codec, its act and kv configs (`bind`)
        self.act = self.kv = None
        self.history: list[float] = []     # the training loss of every step
        self.rotations: dict = {}          # the final R1 and R2s (float64), for the record and tests

    def bind(self, codec=None, act=None, kv=None) -> None:
        """The arm's quantizers to train the rotations for: a weight codec object, `act` and `kv` configs."""
        if act is not None and (act.static or act.scheme == "llamacpp_cpu"):
            raise ValueError("spinquant: the activation quantizer in the loop must be dynamic and fixed: act.static "
                             "and act.scheme llamacpp_cpu are not supported")
        self.codec, self.act, self.kv = codec, act, kv

    def check_model(self, model) -> None:
        """Refuses what `apply` refuses of the model (its layout, a width without a Hadamard, rotated inputs)."""
        self._rotations(model, _llama.layers(model), RunContext())

    def _rotations(self, model, layers, ctx: RunContext):
        """R1, the R2s (their Hadamard starts) and the online rotations, built before any edit."""
        from quantatlas.quant.hadamard import RandomizedHadamard
        from quantatlas.quant.transforms.rotation import online_rotations

        d = _llama.embedding(model).weight.shape[1]
        try:
            r1 = RandomizedHadamard(d, ctx.sub_seed("named", "residual")).matrix()
            r2s = [RandomizedHadamard(layer.head_dim, ctx.sub_seed("named", "heads", layer.index)).matrix()
                   for layer in layers]
            online = online_rotations(layers, self.cfg.online, ctx, RandomizedHadamard, "")
        except ValueError as e:
            raise ValueError(f"spinquant: {e}") from None
        return r1, r2s, online

    def apply(self, model, calib_tokens=None, ctx: RunContext = RunContext()):
        from quantatlas.quant.cayley import CayleySGD
        from quantatlas.quant.transforms.rotation import attach_online, fuse_norm_gains

        cfg = self.cfg
        layers = _llama.layers(model)      # refuses other layouts before any edit
        windows = self._windows(calib_tokens) if cfg.steps else None
        device = _llama.embedding(model).weight.device
        r1, r2s, online = self._rotations(model, layers, ctx)
        teacher = None if windows is None else self._teacher(model, windows.to(device))

        fuse_norm_gains(model, layers)
        rotated = RotatedWeights(model, layers, {id(target): q for target, q in online})
        attach_online(online)   # the hooks; the weights are overwritten by the fold below
        r1 = nn.Parameter(r1.to(device), requires_grad="r1" in cfg.learn)
        r2s = [nn.Parameter(r.to(device), requires_grad="r2" in cfg.learn) for r in r2s]
        if cfg.steps:
            learned = ([r1] if "r1" in cfg.learn else []) + (r2s if "r2" in cfg.learn else [])
            optimizer = CayleySGD(learned, lr=cfg.lr, momentum=cfg.momentum)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / cfg.steps)))
            self._train(model, rotated, r1, r2s, windows.to(device), teacher, optimizer, schedule, ctx)
        with torch.no_grad():
            final = rotated.weights(r1.detach(), [r.detach() for r in r2s])
            params = dict(model.named_parameters())
            for k, v in final.items():
                params[k].copy_(v)
        self.rotations = {"r1": r1.detach().clone(), "r2": [r.detach().clone() for r in r2s]}

    def _windows(self, calib_tokens) -> torch.Tensor:
        tokens = check_calib("spinquant", calib_tokens)
        n, length = tokens.shape
        if n < self.cfg.samples:
            raise ValueError(f"spinquant.samples: {self.cfg.samples} windows asked, the calibration draw has {n} "
                             "(data.calib.samples)")
        if length < self.cfg.seq_len:
            raise ValueError(f"spinquant.seq_len: {self.cfg.seq_len} tokens asked, the calibration windows have "
                             f"{length} (data.calib.seq_len)")
        return tokens[:self.cfg.samples, :self.cfg.seq_len]

    @no_grad
    def _teacher(self, model, windows) -> torch.Tensor:
        """log P_fp [samples, seq_len, vocab] of the model as it is before any edit."""
        out = [model(windows[i:i + self.cfg.batch], use_cache=False).logits.float().log_softmax(-1)
               for i in range(0, len(windows), self.cfg.batch)]
        return torch.cat(out)

    def _train(self, model, rotated, r1, r2s, windows, teacher, optimizer, schedule, ctx) -> None:
        from torch.func import functional_call

        codec = None if self.codec is None else StraightThrough(self.codec.for_run(ctx))
        quantize = None if codec is None else codec.fake_quantize
        rng = ctx.rng("spinquant.batches")
        order: list[int] = []
        with frozen(model), quantizers_in_loop(model, self.act, self.kv, ctx.seed):
            for _ in range(self.cfg.steps):
                if len(order) < self.cfg.batch:
                    order += rng.permutation(len(windows)).tolist()
                idx, order = order[:self.cfg.batch], order[self.cfg.batch:]
                weights = rotated.weights(r1.float(), [r.float() for r in r2s], quantize)
                logits = functional_call(model, weights, (windows[idx],), {"use_cache": False}).logits
                log_p = teacher[idx]
                loss = (log_p.exp() * (log_p - logits.float().log_softmax(-1))).sum(-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                self.history.append(float(loss.detach()))


@contextmanager
def frozen(model):
    """No gradients into the model's own parameters while the rotations train."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def quantizers_in_loop(model, act_cfg, kv_cfg, seed: int):
    """The arm's activation and KV quantizers on `model` with straight-through gradients, removed on exit.

    Activations: around the act step's own hooks (quant/act.py), a hook before stores each Linear's input x
    and hands the quantizer x.detach(); a hook after returns x + (fq(x) − x).detach(). They are registered
    after the online Hadamards' hooks, so the quantizer sees the rotated input, as at evaluation.
    KV cache: the KV quantizer's codecs wrapped in `StraightThrough` (every path of quant/kv.py stores
    through `codec.fake_quantize`)."""
    from quantatlas.quant.act import ActivationQuantizer
    from quantatlas.quant.kv import KVCacheQuantizer

    handles, act, attn = [], None, None
    stash: dict[int, torch.Tensor] = {}

    def keep(module, args):
        stash[id(module)] = args[0]
        return (args[0].detach(),) + tuple(args[1:])

    def straight_through(module, args):
        x = stash.pop(id(module))
        return (x + (args[0].to(x.dtype) - x).detach(),) + tuple(args[1:])

    try:
        if act_cfg is not None:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            handles += [m.register_forward_pre_hook(keep) for m in linears]
            act = ActivationQuantizer(act_cfg, seed)
            act.straight_through = True     # fused experts' inputs (no Linear to hook around)
            act.attach(model)
            handles += [m.register_forward_pre_hook(straight_through) for m in linears]
        if kv_cfg is not None and (kv_cfg.k is not None or kv_cfg.v is not None):
            kv = KVCacheQuantizer(kv_cfg, seed)
            kv.k = None if kv.k is None else StraightThrough(kv.k)
            kv.v = None if kv.v is None else StraightThrough(kv.v)
            attn = model.config._attn_implementation
            kv.attach(model)
        yield
    finally:
        for h in handles:
            h.remove()
        if act is not None:
            act.detach()
        if attn is not None:
            model.config._attn_implementation = attn
