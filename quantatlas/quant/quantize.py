"""The weights step's pass over a model held in memory: each tensor's solver with its codec
(quant/recipe.py). Layer-streamed models take the same per-layer step (`quantize_layer`) from
quant/streamed.py.

RTN needs no data. GPTQ-family solvers go decoder layer by decoder layer: the inputs of
layer 0 are captured once, then each layer is replayed on them (models/replay.py), so only one
layer and its calibration activations need to be on the accelerator at a time.

propagation
  sequential: a layer's Hessians come from inputs produced by the already-quantized
              earlier layers, and within a layer groups go in true-sequential order
              (q/k/v, then o, then gate/up, then down), each seeing its predecessors quantized.
  layer:      a layer's Hessians all come from one pass over its input (the quantized model's
              hidden states) before any of its matrices is quantized, then the layer is solved and
              the stream advanced: two passes per layer (llm-compressor's order) where true-sequential
              takes four partial ones and the advance.
  parallel:   every Hessian comes from the fp model's activations.
gptaq: the target uses the fp model's layer inputs while the update uses the quantized
       model's inputs; the solver receives H from the quantized inputs and the cross term.

Mixture-of-experts layers (models/moe.py): each routed expert's statistics come only from the
tokens its router sends it (optionally weighted by the routing weight, `moe.weighting`), read
from the block's routing as the forward computes it; the router, the experts' gate/up and a
shared expert's gate/up form one true-sequential group (they read the same input), the experts'
down another. An expert that got fewer than `moe.min_tokens` tokens (default: the block's input
width, below which its Hessian is rank-deficient) is starved; `moe.starved` decides what it gets:
`rtn` (round to nearest, no statistics: the default), `fp16` (left unquantized) or `all_tokens`
(statistics from every calibration token run through it, the forward unchanged). The routed tokens
per expert are the run's coverage (`records["moe"]`).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from quantatlas.context import RunContext
from quantatlas.errors import UserError
from quantatlas.models.calib import InputAccumulator
from quantatlas.models.layout import MATRIX_KINDS
from quantatlas.models.moe import BoundMoE, ExpertStatistics, RoutingTap, coverage
from quantatlas.models.replay import StopForward, advance, capture_layer_inputs, run_layer
from quantatlas.models.roles import (decoder_layers, find_roles, get_weight, is_tied, quantizable, sequential_groups,
                                     set_weight)
from quantatlas.quant.codecs.base import Packed
from quantatlas.quant.fused import share_tensor_scales
from quantatlas.quant.recipe import VECTOR_ROLES, Recipe, TensorPlan, build_recipe
from quantatlas.quant.solvers.rtn import rtn


def calibration_tokens(stream: np.ndarray, samples: int, seq_len: int, seed: int | RunContext) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at random offsets of the calibration stream (the seed picks them)."""
    if len(stream) < seq_len + 1:
        raise UserError(f"data.calib: the calibration stream has {len(stream)} tokens, fewer than seq_len={seq_len}",
                        "data.calib")
    rng = as_context(seed).rng("calibration")
    starts = rng.integers(0, len(stream) - seq_len, size=samples)
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64))


def planned_matrices(arm, model, where: str = "arm") -> tuple[Recipe, list[TensorPlan]]:
    """The arm's own recipe (its allocation left out: the codecs the arm names) and its plan of every matrix on
    `model` it gives a codec: what the steps check before any arm runs."""
    recipe = build_recipe(arm.model_copy(update={"allocate": None}), where)
    plans = [p for p in recipe.plan(tensors_to_quantize(model, recipe), model)
             if p.codec is not None and not p.is_vector]
    return recipe, plans


def tensors_to_quantize(model, recipe: Recipe):
    """The decoder matrices (and the head if asked), and the norm vectors an override names; a
    llama.cpp mixture also takes the head and token embeddings, as llama-quantize does (a tied
    head is the embedding, stored once)."""
    if recipe.mixture is None:
        roles = find_roles(model)
        vectors = [t for t in roles if t.role in VECTOR_ROLES and recipe.overridden(t)]
        return quantizable(model, include_head=recipe.include_head) + vectors
    roles = [t for t in find_roles(model) if t.kind in MATRIX_KINDS or t.role == "embed"]
    if is_tied(model):
        roles = [t for t in roles if t.role != "head"]
    return roles


def _solve(plan: TensorPlan, W: torch.Tensor, stats: dict | None) -> tuple[torch.Tensor, Packed]:
    """A matrix through its solver; a vector (a norm's gain) as one row, always round to nearest."""
    if W.dim() == 1:
        w_hat, packed = rtn(W[None], plan.codec)
        return w_hat[0], packed
    if plan.solver.needs and (stats is None or "hessian" not in stats):
        return rtn(W, plan.codec, importance=None if stats is None else stats.get("sq_mean"))
    return plan.solver.solve(W, stats, plan.codec)


def as_context(ctx: int | RunContext) -> RunContext:
    """A bare seed is the context of a CPU run with that seed."""
    return ctx if isinstance(ctx, RunContext) else RunContext(int(ctx))


def quantize_model(model: torch.nn.Module, recipe: Recipe, calib: torch.Tensor | None, ctx: int | RunContext,
                   progress=None, records: dict | None = None) -> dict[str, Packed]:
    """The weight recipe on `model` (held in memory), in place. Returns the packed tensors by
    parameter name (`<module>.weight`; a fused expert tensor's experts as `<experts>.<e>.gate_proj.weight`
    ...). `records`, when given, receives the MoE calibration coverage under "moe"."""
    ctx = as_context(ctx)
    plans = [p for p in recipe.plan(tensors_to_quantize(model, recipe), model) if p.codec is not None]
    for_run(plans, ctx)
    share_tensor_scales(plans)   # NVFP4 `tensor_scale: fused`: q/k/v and gate/up share one amax (quant/fused.py)
    importance = {}
    if recipe.mixture is not None and recipe.mixture.imatrix:
        from quantatlas.quant.imatrix import compute_imatrix

        im = compute_imatrix(model, calib, weighting=recipe.moe.weighting)
        importance = {p.name: im.importance(p.name) for p in plans if recipe.mixture.uses_importance(p.target)}
        if im.routed and records is not None:
            records["moe"] = coverage(im.routed, recipe.moe.threshold(plans))
    packed: dict[str, Packed] = {}
    layered = [p for p in plans if p.solver.needs and p.layer is not None and not p.is_vector]
    direct = [p for p in plans if p not in layered]
    for p in direct:
        packed[p.name + ".weight"] = solve_direct(p, importance.get(p.name))
        if progress:
            progress(1)
    if layered:
        if calib is None:
            raise ValueError("a GPTQ-family solver needs calibration data")
        stream = _layerwise(model, recipe, layered, calib, packed, progress)
        if stream.routed and records is not None:
            records["moe"] = coverage(stream.routed, stream.threshold)
    return packed


def for_run(plans: list[TensorPlan], ctx: RunContext) -> None:
    """One per-run codec per recipe codec (a turbo rotation is built once); solvers likewise."""
    run_codecs: dict[int, object] = {}
    run_solvers: dict[int, object] = {}
    for p in plans:
        p.codec = run_codecs.setdefault(id(p.codec), p.codec.for_run(ctx))
        p.solver = run_solvers.setdefault(id(p.solver), p.solver.for_run(ctx))


def solve_direct(p: TensorPlan, importance=None) -> Packed:
    """A tensor that needs no layer statistics (RTN, a norm vector, the head): solved in place."""
    w_hat, packed = _solve(p, get_weight(p.target), None if importance is None else {"sq_mean": importance})
    set_weight(p.target, w_hat)
    return packed


@torch.no_grad()
def _layerwise(model, recipe: Recipe, plans: list[TensorPlan], calib, packed, progress, batch: int = 8):
    layers = decoder_layers(model)
    by_layer: dict[int, list[TensorPlan]] = {}
    for p in plans:
        by_layer.setdefault(p.layer, []).append(p)
    stream = LayerStream(capture_layer_inputs(model, layers[0], calib, batch), recipe, plans)
    for li, layer in enumerate(layers):
        quantize_layer(layer, by_layer.get(li, []), recipe, stream, packed, progress)
    return stream


class LayerStream:
    """The calibration activations between decoder layers: the captured inputs of layer 0 (hidden
    states and the keyword arguments every layer takes), the quantized model's hidden states and,
    for parallel propagation and GPTAQ, the fp model's."""

    def __init__(self, inputs, recipe: Recipe, plans: list[TensorPlan]):
        self.inputs = inputs
        self.q_hidden = [h for h, _, _ in inputs]
        self.fp_hidden = list(self.q_hidden)
        self.gptaq = any("cross" in p.solver.needs for p in plans)
        self.track_fp = recipe.propagation == "parallel" or self.gptaq
        self.routed: dict[int, list[int]] = {}   # MoE layer -> calibration tokens routed to each expert
        self.threshold = recipe.moe.threshold(plans)


@torch.no_grad()
def quantize_layer(layer, todo: list[TensorPlan], recipe: Recipe, stream: LayerStream, packed: dict,
                   progress=None) -> None:
    """One decoder layer of a GPTQ-family pass: collect each group's statistics on the stream, solve
    its matrices in place (packed tensors into `packed`), then advance the stream through the layer.
    The in-memory pass (`_layerwise`) and the streamed one (quant/streamed.py) both call this."""
    fp_layer = copy.deepcopy(layer) if stream.track_fp and todo else None
    experts = [p for p in todo if p.target.expert is not None]
    moe = experts[0].target.moe if experts else None
    all_tokens: set[int] = set()
    if moe is not None and recipe.moe.starved == "all_tokens":
        # which experts are starved must be known before their statistics are collected
        stream.routed[experts[0].layer] = count_routing(layer, moe, stream)
        all_tokens = {e for e, n in enumerate(stream.routed[experts[0].layer]) if n < stream.threshold}
    if todo:
        if recipe.propagation in ("parallel", "layer"):
            groups = [todo]
        else:
            names = {p.name for p in todo}
            groups = [[p for p in todo if p.target.name in {t.name for t in g}]
                      for g in sequential_groups([p.target for p in todo])]
            groups = [g for g in groups if g]
            assert sum(len(g) for g in groups) == len(names)
        for group in groups:
            # parallel: one group, collected before anything in this layer changes, on the fp stream
            src = stream.fp_hidden if recipe.propagation == "parallel" else stream.q_hidden
            stats = collect_statistics(layer, group, src, stream.inputs, fp_layer if stream.gptaq else None,
                                       stream.fp_hidden, recipe.moe.weighting, all_tokens)
            together: dict[tuple, list] = {}   # experts of one role whose solver takes them in one batch
            for p in group:
                s = stats.pop(p.name)
                if p.target.expert is not None:
                    routed = stream.routed.setdefault(p.layer, s.pop("routed"))
                    if routed[p.target.expert] < stream.threshold and recipe.moe.starved != "all_tokens":
                        if recipe.moe.starved == "fp16":   # left as it is: stored in fp16, not packed
                            if progress:
                                progress(1)
                            continue
                        s = None                            # rtn: rounded without statistics
                W = get_weight(p.target)
                if (p.target.expert is not None and s is not None and "hessian" in s and W.dim() == 2
                        and p.solver.can_batch(p.codec, W)):
                    together.setdefault((p.role, id(p.solver), id(p.codec), tuple(W.shape)), []).append((p, W, s))
                    continue
                _solve_in_place(p, W, s, packed)
                del W, s
                if progress:
                    progress(1)
            for batch in together.values():
                _solve_batch_in_place(batch, packed)
                if progress:
                    progress(len(batch))
            del stats, together
    # advance both streams through this layer
    inputs = stream.inputs
    if stream.track_fp:
        ref = fp_layer if fp_layer is not None else layer
        stream.fp_hidden = advance(ref, stream.fp_hidden, inputs)
    stream.q_hidden = advance(layer, stream.q_hidden, inputs)
    if not stream.track_fp:
        stream.fp_hidden = stream.q_hidden
    del fp_layer


def _solve_in_place(p: TensorPlan, W: torch.Tensor, s: dict | None, packed: dict) -> None:
    """One matrix through its solver; Ŵ takes the weight's place (its storage freed while the solver works)."""
    released = _release_weight(p.target)
    try:
        w_hat, packed[p.name + ".weight"] = _solve(p, W, s)
    except BaseException:
        if released:
            p.target.module.weight.data = W.to(released)
        raise
    _put_weight(p, w_hat, released)


def _solve_batch_in_place(batch: list[tuple[TensorPlan, torch.Tensor, dict]], packed: dict) -> None:
    """Experts of one role, shape, solver and codec solved together (`Solver.solve_batch`), each Ŵ written back."""
    plans = [p for p, _, _ in batch]
    Ws = [W for _, W, _ in batch]
    released = [_release_weight(p.target) for p in plans]
    try:
        results = plans[0].solver.solve_batch(Ws, [s for _, _, s in batch], plans[0].codec)
    except BaseException:
        for p, W, dtype in zip(plans, Ws, released):
            if dtype:
                p.target.module.weight.data = W.to(dtype)
        raise
    for p, dtype, (w_hat, pk) in zip(plans, released, results):
        packed[p.name + ".weight"] = pk
        _put_weight(p, w_hat, dtype)


def _put_weight(p: TensorPlan, w_hat: torch.Tensor, released: torch.dtype | None) -> None:
    if released:
        p.target.module.weight.data = w_hat.to(released).contiguous()
    else:
        set_weight(p.target, w_hat)


def count_routing(layer, moe, stream: LayerStream) -> list[int]:
    """Calibration tokens routed to each expert of the layer's MoE block (a pass that stops at the router)."""
    counts = [0] * moe.n_experts

    def count(routing):
        for e in routing.index.reshape(-1).tolist():
            counts[e] += 1
        raise StopForward

    tap = RoutingTap(BoundMoE(moe), count)
    try:
        for h, (_, r, k) in zip(stream.q_hidden, stream.inputs):
            try:
                run_layer(layer, h, r, k)
            except StopForward:
                pass
    finally:
        tap.remove()
    return counts


def _release_weight(t) -> torch.dtype | None:
    """While a solver works on its copy, a Linear's own weight is not needed: its storage is freed
    (one matrix less at the largest moment of a layer) and the solver's Ŵ takes its place. Returns
    the weight's dtype, or None where the weight stays (other layouts, a head tied to the embedding)."""
    w = getattr(t.module, "weight", None)
    if t.kind != "linear" or t.role == "head" or not isinstance(w, torch.nn.Parameter):
        return None
    dtype = w.dtype
    w.data = torch.empty(0, dtype=dtype, device=w.device)
    return dtype


def collect_statistics(layer, group: list[TensorPlan], hidden, inputs, fp_layer, fp_hidden, weighting: str = "tokens",
             all_tokens=()) -> dict[str, dict]:
    """Hessians (and for GPTAQ the cross term) of the group's modules on one pass over the calibration set.

    Each layer pass stops as soon as every module of the group has seen its input, so the
    q/k/v group costs a fraction of a layer forward rather than all of it. Modules fed the very same
    input tensor (q/k/v, gate/up) share one accumulation; each gets its own copy of the result.
    Routed experts (MoE) are not modules with inputs of their own: their statistics come from the block's
    routing (models/moe.py), each expert's from the tokens routed to it (`all_tokens`: experts fed every
    token); their entries also carry "routed", the tokens routed to each expert of the block.
    """
    expert_plans = [p for p in group if p.target.expert is not None]
    plain = [p for p in group if p.target.expert is None]
    modules = {p.name: p.target.module for p in plain}
    sums = any("sq_mean" in p.solver.needs for p in group)   # GPTQ reads H alone
    accs = {n: InputAccumulator(_width(p), p.target.module.weight.device, channel_sums=sums)
            for n, p in zip(modules, plain)}
    cross = ({n: torch.zeros(a.width, a.width, device=a.device) for n, a in accs.items()}
             if fp_layer is not None else None)
    fp_x: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    handles = []
    same_input: dict[str, str] = {}          # module -> the module whose accumulation is its input's
    this_pass: list[tuple[torch.Tensor, str]] = []   # inputs seen in this pass (held: no id reuse)
    n_targets = len(modules) + len(expert_plans)
    experts = fp_routing = None
    if expert_plans:
        moe = expert_plans[0].target.moe
        fp_moe = BoundMoE(moe, fp_layer) if fp_layer is not None else None
        experts = ExpertStatistics(BoundMoE(moe), {p.name: p.target for p in expert_plans}, weighting=weighting,
                                   all_tokens=all_tokens, fp=fp_moe)
        fp_routing = {}

        def on_fp_routing(routing):
            fp_routing["last"] = routing
            if len(fp_x) == len(modules):
                raise StopForward

        def on_routing(routing):
            experts.add(routing, fp_routing.get("last"))
            seen.update(p.name for p in expert_plans)
            if len(seen) == n_targets:
                raise StopForward

        handles.append(RoutingTap(experts.bound, on_routing))
        if fp_moe is not None:
            handles.append(RoutingTap(fp_moe, on_fp_routing))

    def fp_hook(mod, args, n):
        fp_x[n] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if len(fp_x) == len(modules) and (fp_routing is None or "last" in fp_routing):
            raise StopForward

    def q_hook(mod, args, n):
        owner = next((m for t, m in this_pass if t is args[0]), None) if cross is None else None
        if n in same_input or owner is not None:
            if same_input.setdefault(n, owner) != owner:
                raise RuntimeError(f"{n}: its input changed between calibration batches")
        else:
            this_pass.append((args[0], n))
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            accs[n].add(x)
            if cross is not None:
                cross[n].addmm_((fp_x[n] - x).T, x)
        seen.add(n)
        if len(seen) == n_targets:
            raise StopForward

    if fp_layer is not None:
        fp_named = dict(fp_layer.named_modules())
        layer_named = {id(m): n for n, m in layer.named_modules()}
        for n, m in modules.items():
            handles.append(fp_named[layer_named[id(m)]].register_forward_pre_hook(
                lambda mod, args, n=n: fp_hook(mod, args, n)))
    for n, m in modules.items():
        handles.append(m.register_forward_pre_hook(lambda mod, args, n=n: q_hook(mod, args, n)))
    try:
        for b, (h, (_, r, k)) in enumerate(zip(hidden, inputs)):
            if fp_layer is not None:
                fp_x.clear()
                if fp_routing is not None:
                    fp_routing.clear()
                try:
                    run_layer(fp_layer, fp_hidden[b], r, k)
                except StopForward:
                    pass
            seen.clear()
            try:
                run_layer(layer, h, r, k)
            except StopForward:
                pass
            this_pass.clear()
    finally:
        for hd in handles:
            hd.remove()
    out = {}
    for n, a in accs.items():
        if n in same_input:
            continue
        s = a.result()
        d = {"hessian": s.hessian} if s.sq_mean is None else {"hessian": s.hessian, "sq_mean": s.sq_mean}
        if cross is not None:
            d["cross"] = cross.pop(n).mul_(2.0 / max(s.count, 1))
        out[n] = d
    for n, owner in same_input.items():
        out[n] = {k: v.clone() for k, v in out[owner].items()}
    if experts is not None:
        routed = experts.routed.tolist()
        for n, d in experts.result().items():
            d.pop("tokens")
            out[n] = {**d, "routed": routed}
    return out


def _width(p: TensorPlan) -> int:
    return p.target.shape[1]
