"""Mixture-of-experts blocks at calibration time: which tokens the router sends to each expert, and
the statistics of each expert's inputs from those tokens only.

An MoE block (models/layout.py: `MoELayout`) computes, for the rows x_t of its input,

    p_t = softmax(router x_t)                      scores over the E experts
    S_t = top_k(p_t)                               the experts the token goes to, weights w_te = p_te
                                                   (renormalised over S_t where the family does)
    y_t = sum_{e in S_t} w_te down_e(act(gate_e x_t) * up_e x_t)

so expert e's gate and up read only the rows {x_t : e in S_t}, and its down reads those rows' hidden
act(gate_e x_t) * up_e x_t. `RoutingTap` observes (x, S, w) of every forward pass of a block: transformers'
fused experts receive them as arguments (a pre-hook reads them as the forward uses them); a ModuleList of
expert MLPs is fed by an nn.Linear router whose logits the tap turns into (S, w) as above (`route`).
`ExpertStatistics` then accumulates, per expert, the GPTQ Hessian H_e = (2/N_e) sum_t x_t x_t^T over the
N_e routed rows (llama.cpp's imatrix counts mul_mat_id's rows the same way: per expert), with two options:

- weighting "tokens" (the default): each routed row counts once. "routing": row t counts w_te^2 (its
  outer product scaled by the square of its routing weight), because the block scales expert e's output
  for token t by w_te, so an error dW x_t of the expert reaches the block's output as w_te dW x_t and
  its squared size as w_te^2 |dW x_t|^2: the layer-wise GPTQ objective of that output. The default is
  the unweighted count because it is what llama.cpp's imatrix and llm-compressor/GPTQModel's per-expert
  hooks compute (results stay comparable to what people run), because with renormalised top-2 routing the
  weights of the chosen experts are mostly near 1/2 (little to gain), and because weighting shrinks the
  effective sample of an expert that is already short of tokens.
- `all_tokens`: experts whose statistics come from every row of the block's input (each expert's down
  from its own hidden on every row), for experts starved of routed tokens (llm-compressor's "calibrate
  all experts"); statistics only: the forward pass, and so the logits, are unchanged.

`routed` counts the routed rows per expert whatever the statistics use: the run's coverage.

`BoundMoE.output` recomputes the routed experts' sum above, each expert on its routed rows, with a hook on
each matrix's input: the activation step's forward for fused experts (quant/act.py, `FusedExperts`).
Where a rotation transform rotates the experts' down input online (quant/online.py), `hidden` and `output`
rotate it too: the statistics and the quantizers see what the down projections read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantatlas.models.calib import InputAccumulator
from quantatlas.models.layout import MoELayout

WEIGHTINGS = ("tokens", "routing")


def route(logits: torch.Tensor, top_k: int, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts [T, k], weights [T, k]) of router logits [T, E]: softmax over the experts, the top k,
    renormalised to sum to 1 where the family does (Mixtral, Qwen3-MoE); fp32 as transformers computes them."""
    probs = torch.softmax(logits.float(), dim=-1)
    weight, index = torch.topk(probs, top_k, dim=-1)
    if normalise:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return index, weight


@dataclass
class Routing:
    """One forward pass of an MoE block: its input rows, each row's experts and their weights."""
    x: torch.Tensor        # [T, hidden]
    index: torch.Tensor    # [T, top_k]
    weight: torch.Tensor   # [T, top_k]

    def rows_of(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows routed to `expert`, their routing weights)."""
        tok, slot = (self.index == expert).nonzero(as_tuple=True)
        return tok, self.weight[tok, slot]


def fused_matrix(p: torch.Tensor, rows: slice, transposed: bool) -> torch.Tensor:
    """One expert's [out, in] matrix in its slice p of a fused 3-D parameter (p = param[e]: [rows, in], or
    [in, rows] where stored transposed), as the layout reads it (TensorRole.rows/transposed): a view. The one
    place an expert's matrix is located in a fused tensor (BoundMoE.weight, FusedExpertWeights.matrix,
    quant/online.py's FusedMatrices)."""
    return p[:, rows].t() if transposed else p[rows]


class BoundMoE:
    """An MoE block of the layout found in one copy of its decoder layer (the working model, or a deep
    copy such as GPTAQ's fp layer): its router and experts modules, and each expert's weights."""

    def __init__(self, moe: MoELayout, layer: nn.Module | None = None):
        self.moe = moe
        block = moe.block if layer is None else layer.get_submodule(moe.path)
        self.router = block.get_submodule(moe.router_path)
        self.experts = block.get_submodule(moe.experts_path)

    def weight(self, expert: int, role: str) -> torch.Tensor:
        """Expert `expert`'s current `role` matrix [out, in], a view of the model's tensor."""
        t = self.moe.experts[expert][role]
        if t.param is not None:
            return fused_matrix(getattr(self.experts, t.param)[expert], t.rows, t.transposed)
        return self.experts[expert].get_submodule(t.name.rsplit(".", 1)[1]).weight

    def down_rotation(self, expert: int):
        """The online rotation x <- Q x of expert `expert`'s down input (quant/online.py: a fused block's
        `down_rotation`, shared by its experts; an expert Linear's `input_rotation`), or None."""
        if self.moe.fused:
            return getattr(self.experts, "down_rotation", None)
        down = self.experts[expert].get_submodule(self.moe.experts[expert]["expert_down"].name.rsplit(".", 1)[1])
        return getattr(down, "input_rotation", None)

    def hidden(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """What expert `expert`'s down projection reads for rows x: act(x gate^T) * (x up^T), as the forward,
        rotated where the down input is rotated online."""
        gate = nn.functional.linear(x, self.weight(expert, "expert_gate").to(x.dtype))
        up = nn.functional.linear(x, self.weight(expert, "expert_up").to(x.dtype))
        rotation = self.down_rotation(expert)
        h = self.moe.act(gate) * up
        return h if rotation is None else rotation(h)

    def output(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, transform=None) -> torch.Tensor:
        """The routed experts' output for rows x [T, hidden] routed by (index, weight) [T, top_k], as the fused
        forward computes it: y_t = sum_{e in S_t} w_te down_e(act(gate_e x_t) * up_e x_t), one expert at a
        time on all its routed rows, the down input rotated where it is rotated online (`down_rotation`).
        `transform(expert, role, rows, tok)` returns what that matrix reads instead of `rows` (tok: their rows
        in x), e.g. the activation step's quantizers; None: the rows as they are."""
        return experts_output(x, index, weight, self.moe.n_experts, self.weight, self.moe.act, self.down_rotation,
                              transform)


def experts_output(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, n_experts: int, matrix, act,
                   down_rotation=None, transform=None) -> torch.Tensor:
    """y_t = sum_{e in S_t} w_te down_e(R act(gate_e x_t) * up_e x_t) for rows x [T, hidden] routed by (index,
    weight) [T, top_k], one expert at a time on all its routed rows (transformers' fused forward). `matrix(e, role)`
    is expert e's [out, in] matrix; `down_rotation(e)` the online rotation R of its down input or None (identity);
    `transform(expert, role, rows, tok)` as in `BoundMoE.output`, after R on the down input."""
    out = torch.zeros_like(x)
    routing = Routing(x, index, weight)
    same = (lambda e, role, rows, tok: rows) if transform is None else transform
    for e in range(n_experts):
        tok, w = routing.rows_of(e)     # an index of E (transformers' "no expert") matches no e: skipped
        if tok.numel() == 0:
            continue
        rows = x[tok]
        gate = nn.functional.linear(same(e, "expert_gate", rows, tok), matrix(e, "expert_gate").to(x.dtype))
        up = nn.functional.linear(same(e, "expert_up", rows, tok), matrix(e, "expert_up").to(x.dtype))
        h = act(gate) * up
        rotation = None if down_rotation is None else down_rotation(e)
        h = same(e, "expert_down", h if rotation is None else rotation(h), tok)
        y = nn.functional.linear(h, matrix(e, "expert_down").to(x.dtype)) * w[:, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


class RoutingTap:
    """Calls `fn(Routing)` each time the bound block runs (see the module docstring); `remove()` detaches."""

    def __init__(self, bound: BoundMoE, fn):
        self.bound, self.fn = bound, fn
        moe = bound.moe
        if moe.fused:
            self.handle = bound.experts.register_forward_pre_hook(self._experts_hook, with_kwargs=True)
        else:
            self.handle = bound.router.register_forward_hook(self._router_hook)

    def _experts_hook(self, module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        hidden, index, weight = [args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names)]
        self.fn(Routing(hidden.reshape(-1, hidden.shape[-1]), index.reshape(index.shape[0], -1),
                        weight.reshape(weight.shape[0], -1)))

    def _router_hook(self, module, args, out):
        x = args[0]
        x = x.reshape(-1, x.shape[-1])
        moe = self.bound.moe
        if isinstance(out, tuple) and len(out) == 3:    # a router that routes (logits, weights, experts)
            index, weight = out[2], out[1]
        else:
            index, weight = route(out[0] if isinstance(out, tuple) else out, moe.top_k, moe.normalise)
        self.fn(Routing(x, index.reshape(x.shape[0], -1), weight.reshape(x.shape[0], -1)))

    def remove(self) -> None:
        self.handle.remove()


class ExpertStatistics:
    """Per-expert input statistics of some expert matrices of one MoE block (module docstring).

    `targets`: name -> expert TensorRole (its expert index and role); gate and up of one expert read the
    same rows and share one accumulation. `all_tokens`: expert indices whose statistics use every row.
    `fp` (GPTAQ): the block in the fp layer; `add` then also takes the fp routing of the same rows and
    accumulates the cross term (X_fp - X)^T X of each expert's inputs on the rows the quantized router picks."""

    def __init__(self, bound: BoundMoE, targets: dict, hessian: bool = True, weighting: str = "tokens",
                 all_tokens=(), fp: BoundMoE | None = None):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"moe.weighting: expected one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.bound, self.weighting, self.fp = bound, weighting, fp
        self.all_tokens = frozenset(all_tokens)
        self.targets = dict(targets)
        self.keys = {n: (t.expert, "hidden" if t.role == "expert_down" else "input") for n, t in self.targets.items()}
        self.accs: dict[tuple[int, str], InputAccumulator] = {}
        self.cross: dict[tuple[int, str], torch.Tensor] = {}
        for n, t in self.targets.items():
            key = self.keys[n]
            if key not in self.accs:
                device = bound.weight(t.expert, t.role).device
                self.accs[key] = InputAccumulator(t.shape[1], device, hessian)
                if fp is not None:
                    self.cross[key] = torch.zeros(t.shape[1], t.shape[1], device=device)
        self.kinds: dict[int, list[str]] = {}    # expert -> the inputs accumulated for it ("input", "hidden")
        for e, kind in self.accs:
            self.kinds.setdefault(e, []).append(kind)
        self.routed = torch.zeros(bound.moe.n_experts, dtype=torch.long)

    @torch.no_grad()
    def add(self, routing: Routing, fp_routing: Routing | None = None) -> None:
        for e in range(self.bound.moe.n_experts):
            tok, w = routing.rows_of(e)
            self.routed[e] += tok.numel()
            kinds = self.kinds.get(e)
            if not kinds:
                continue
            if e in self.all_tokens:
                tok, w = torch.arange(routing.x.shape[0], device=routing.x.device), None
            elif self.weighting == "tokens":
                w = None
            if tok.numel() == 0:
                continue
            x = routing.x[tok].float()
            x_fp = fp_routing.x[tok].float() if fp_routing is not None else None
            for kind in kinds:
                if kind == "input":
                    q_in, fp_in = x, x_fp
                else:
                    q_in = self.bound.hidden(e, x)
                    fp_in = self.fp.hidden(e, x_fp) if x_fp is not None else None
                self.accs[(e, kind)].add(q_in, w)
                if fp_in is not None:
                    scale = 1.0 if w is None else w.reshape(-1, 1).float()
                    self.cross[(e, kind)].addmm_(((fp_in - q_in) * scale).T, q_in * scale)

    def result(self) -> dict[str, dict]:
        """name -> {"hessian", "sq_mean", "abs_mean", "tokens" (routed rows), "cross" (GPTAQ)}; gate and up get
        copies."""
        done: dict[tuple[int, str], dict] = {}
        out = {}
        for n, key in self.keys.items():
            if key in done:
                out[n] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in done[key].items()}
                continue
            s = self.accs[key].result()
            d = {"hessian": s.hessian, "sq_mean": s.sq_mean, "abs_mean": s.abs_mean, "tokens": int(self.routed[key[0]])}
            if key in self.cross:
                d["cross"] = self.cross.pop(key).mul_(2.0 / max(s.count, 1))
            done[key] = out[n] = d
        return out


def coverage(routed: dict[int, list[int]], threshold: int) -> dict:
    """Calibration coverage of the experts: routed tokens per expert (layer -> one count per expert), their
    min / median / max over every expert of every layer, and the experts under `threshold` tokens."""
    counts = sorted(n for layer in routed.values() for n in layer)
    if not counts:
        return {}
    mid = len(counts) // 2
    median = counts[mid] if len(counts) % 2 else (counts[mid - 1] + counts[mid]) / 2
    under = [[layer, e, n] for layer, per in sorted(routed.items()) for e, n in enumerate(per) if n < threshold]
    return {"tokens_min": counts[0], "tokens_median": median, "tokens_max": counts[-1], "experts": len(counts),
            "threshold": threshold, "under_threshold": under,
            "tokens": {str(layer): list(per) for layer, per in sorted(routed.items())}}


# ---- fused expert parameters built from their experts' matrices (finetune recovery) ----------------

def assemble_experts(moe: MoELayout, param: str, matrix) -> torch.Tensor:
    """The fused 3-D parameter `param` of a block's experts module (e.g. gate_up_proj [E, 2I, H], or [E, H, 2I]
    where stored transposed) built from each expert's [out, in] matrices `matrix(e, role)`: the inverse of
    `BoundMoE.weight`. Only stack, cat and a row permutation (interleaved gate/up), so it is differentiable
    in what `matrix` returns."""
    roles = [r for r, t in moe.experts[0].items() if t.param == param]
    if not roles:
        raise ValueError(f"{moe.name}: no expert matrix is stored in {param}")
    first = moe.experts[0][roles[0]]
    stored = getattr(moe.experts_module, param)
    n_rows = stored.shape[2] if first.transposed else stored.shape[1]
    rows = torch.cat([torch.arange(n_rows)[moe.experts[0][r].rows] for r in roles])   # param row of each stacked row
    if not torch.equal(rows.sort().values, torch.arange(n_rows)):
        raise ValueError(f"{moe.name}: the experts' matrices do not cover {param}'s {n_rows} rows once each")
    # param row k is stacked row order[k] (None: the same order, gate then up)
    order = None if torch.equal(rows, torch.arange(n_rows)) else torch.argsort(rows)
    per = []
    for e in range(moe.n_experts):
        m = torch.cat([matrix(e, r) for r in roles])
        per.append(m if order is None else m[order.to(m.device)])
    out = torch.stack(per)
    return out.transpose(1, 2) if first.transposed else out


class FusedExpertWeights:
    """A model's fused expert matrices under the names the weights step packs them as
    (`<experts>.<e>.gate_proj.weight` ...), for a forward by `torch.func.functional_call` that uses
    per-expert matrices being trained: `parameters(weights)` puts, in place of those names, each fused
    3-D parameter they belong to, assembled from them (`assemble_experts`) and, for the experts not in
    `weights`, the model's own matrices (constants). Empty on a model without fused experts.

    `routers`: the router weights of those blocks, [experts, hidden] matrices their router module reads with
    F.linear without being an nn.Linear (transformers 5's TopKRouter): trainable as a Linear's weight where
    the recipe packs them."""

    def __init__(self, model: nn.Module):
        from quantatlas.models.layout import layout

        self.roles: dict = {}                          # name -> TensorRole (kind "expert")
        self.blocks: list[tuple[str, BoundMoE]] = []   # (the experts module's name, its block)
        self.routers: set[str] = set()
        if not any(p.dim() == 3 for p in model.parameters()):   # the layout is read only where experts may be fused
            return
        for moe in layout(model).moe_blocks:
            if not moe.fused:
                continue
            self.blocks.append((f"{moe.name}.{moe.experts_path}", BoundMoE(moe)))
            self.roles.update({t.name + ".weight": t for t in moe.tensors()})
            if not isinstance(moe.router.module, nn.Linear):
                self.routers.add(moe.router.name + ".weight")

    def __contains__(self, name: str) -> bool:
        return name in self.roles

    def matrix(self, name: str) -> torch.Tensor:
        """The model's current [out, in] matrix `name` (a view of the fused parameter)."""
        t = self.roles[name]
        return fused_matrix(getattr(t.module, t.param)[t.expert], t.rows, t.transposed)

    def parameters(self, weights: dict) -> dict:
        """`weights` (parameter name -> tensor) with its expert matrices replaced by the fused parameters that
        hold them (`<experts>.gate_up_proj` ...); a fused parameter none of whose matrices is given is left out
        (the model's own is used)."""
        if not self.roles or not any(n in self.roles for n in weights):
            return weights
        out = {n: w for n, w in weights.items() if n not in self.roles}
        for prefix, bound in self.blocks:
            for param in dict.fromkeys(t.param for t in bound.moe.experts[0].values()):
                given = [weights[t.name + ".weight"] for t in bound.moe.tensors()
                         if t.param == param and t.name + ".weight" in weights]
                if given:
                    out[f"{prefix}.{param}"] = assemble_experts(bound.moe, param, self._matrices(bound, weights,
                                                                                                given[0].dtype))
        return out

    @staticmethod
    def _matrices(bound: BoundMoE, weights: dict, dtype):
        """matrix(e, role): the given matrix, else the model's own (detached, in the given ones' dtype)."""
        def matrix(e: int, role: str) -> torch.Tensor:
            w = weights.get(bound.moe.experts[e][role].name + ".weight")
            return bound.weight(e, role).detach().to(dtype) if w is None else w
        return matrix
