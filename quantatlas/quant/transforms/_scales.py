"""Diagonal input scales and where their inverse goes (shared by equalize, awq and smoothquant).

For a consumer group whose input x reaches the linears W_c, W_c ← W_c diag(s) while the op
that produced x is changed to produce x / s, so every W_c x is unchanged:

    qkv      x = input_layernorm(h)        γ1 ← γ1 / s
    gate_up  x = post_attention_layernorm  γ2 ← γ2 / s
    down     x = act(gate) ⊙ up            up rows (and bias) ← / s
    o        x = attention(v)              v rows (and bias) ← / s, per kv head

For `o`, query heads that share a kv head (GQA) see the same v channels, so s is chosen per
kv-head channel and repeated for every query head of the group; per-channel statistics of
o's input are averaged over those query heads first.

Mixture-of-experts layers (attention stays dense: qkv and o as above). A `Site` is one free scale:

    gate_up  one s on post_attention_layernorm's output; its readers are the router, every expert's
             gate and up and a shared expert's gate, up and router (the routers' columns are scaled
             too, so the logits and the routing are unchanged). Its statistics are every token's.
    down     one s_e per expert on its own down input act(gate_e x) ⊙ up_e x: up_e rows ← / s_e,
             down_e columns ← × s_e, statistics from the rows the router sends expert e
             (models/moe.py); a shared expert is a dense MLP on every token.

A site's `quantized` weights are the ones a codec sees (the routers stay fp16), each with the key of
its own input statistics: in an MoE gate_up, expert e's gate and up read only its routed rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from quantatlas._lazy import nn, no_grad, torch

from quantatlas.quant.transforms import _llama


def consumers(layer: _llama.Layer, group: str) -> list[nn.Linear]:
    return {"qkv": [layer.q, layer.k, layer.v], "gate_up": [layer.gate, layer.up],
            "o": [layer.o], "down": [layer.down]}[group]


def reduce_stat(layer: _llama.Layer, group: str, stat: torch.Tensor) -> torch.Tensor:
    """Per-channel statistic of the group's input → per free scale (kv-head channels for o)."""
    if group != "o":
        return stat
    rep = layer.n_heads // layer.n_kv_heads
    return stat.reshape(layer.n_kv_heads, rep, layer.head_dim).mean(1).reshape(-1)


def expand_scale(layer: _llama.Layer, group: str, s: torch.Tensor) -> torch.Tensor:
    """Free scales → one per input channel of the consumers (query-head channels for o)."""
    if group != "o":
        return s
    rep = layer.n_heads // layer.n_kv_heads
    return s.reshape(layer.n_kv_heads, 1, layer.head_dim).expand(-1, rep, -1).reshape(-1)


@dataclass
class Site:
    """One free diagonal scale s (module docstring): the weights whose columns take × s, the op whose
    output takes / s, and where the statistics of its input come from.

    `key` names the input's statistics ("3/qkv", "3/gate_up"; an MoE layer's "3/down/5" for expert 5,
    "3/down/shared"); `sources` maps that key, and the key of each quantized weight's own input, to a
    module whose input it is on every token or to a routed expert's TensorRole (its routed rows)."""
    key: str
    layer: _llama.Layer
    group: str
    readers: list[torch.Tensor]                  # [out, in] views: columns × s (routers included)
    quantized: list[tuple[torch.Tensor, str]]    # what a codec sees, with the key of its input statistics
    sources: dict[str, object]
    linears: list[nn.Module] = field(default_factory=list)   # the nn.Linear readers (online rotation check)
    expert: int | None = None                    # MoE down: the routed expert (None: the shared expert)
    up: torch.Tensor | None = None               # MoE down: the up rows that take / s ...
    up_bias: torch.Tensor | None = None          # ... and their bias

    @property
    def dense(self) -> bool:
        """A group of a dense layer, or MoE attention: `fold` below, one consumer group of linears."""
        return self.layer.moe is None or self.group in ("qkv", "o")

    def reduce(self, stat: torch.Tensor) -> torch.Tensor:
        return reduce_stat(self.layer, self.group, stat)

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        return expand_scale(self.layer, self.group, s)

    @no_grad
    def fold(self, s: torch.Tensor) -> None:
        """Readers' columns × s, the producer's output / s."""
        if self.dense:
            fold(self.layer, self.group, s)
            return
        s = s.double()
        for w in self.readers:
            _llama.scale_matrix_columns(w, s)
        if self.group == "gate_up":
            _llama.scale_vector(self.layer.post_norm.weight, 1.0 / s)
            return
        self.up.copy_((self.up.double() / s.to(self.up.device)[:, None]).to(self.up.dtype))
        if self.up_bias is not None:
            _llama.scale_vector(self.up_bias, 1.0 / s)


def sites(layer: _llama.Layer, group: str) -> list[Site]:
    """The free scales of one group of a layer: one, except an MoE layer's down (one per expert, and the
    shared expert's)."""
    key = f"{layer.index}/{group}"
    if layer.moe is None or group in ("qkv", "o"):
        lins = consumers(layer, group)
        return [Site(key, layer, group, [lin.weight for lin in lins], [(lin.weight, key) for lin in lins],
                     {key: lins[0]}, lins)]
    bound, moe = layer.moe, layer.moe.moe
    shared = moe.shared
    if group == "gate_up":
        sources, quantized = {key: bound.router}, []
        for e, roles in enumerate(moe.experts):
            k = f"{key}/{e}"                      # expert e's gate and up read its routed rows
            sources[k] = roles["expert_gate"]
            quantized += [(bound.weight(e, "expert_gate"), k), (bound.weight(e, "expert_up"), k)]
        quantized += [(shared[r].module.weight, key) for r in ("shared_expert_gate", "shared_expert_up")
                      if r in shared]             # the shared expert reads every token
        linears = [bound.router, *(roles[r].module for roles in moe.experts for r in ("expert_gate", "expert_up")),
                   *(t.module for r, t in shared.items() if r != "shared_expert_down")]
        return [Site(key, layer, group, _llama.mlp_readers(layer), quantized, sources,
                     [m for m in linears if isinstance(m, nn.Linear)])]
    out = []
    for e, roles in enumerate(moe.experts):
        k, down, up = f"{key}/{e}", roles["expert_down"], roles["expert_up"]
        w = bound.weight(e, "expert_down")
        out.append(Site(k, layer, group, [w], [(w, k)], {k: down},
                        [down.module] if isinstance(down.module, nn.Linear) else [], expert=e,
                        up=bound.weight(e, "expert_up"),
                        up_bias=up.module.bias if isinstance(up.module, nn.Linear) else None))
    if "shared_expert_down" in shared:
        k = f"{key}/shared"
        down, up = shared["shared_expert_down"].module, shared["shared_expert_up"].module
        out.append(Site(k, layer, group, [down.weight], [(down.weight, k)], {k: down}, [down],
                        up=up.weight, up_bias=up.bias))
    return out


def check_foldable(site: Site, transform: str) -> None:
    from quantatlas.quant.online import has_online_rotation

    layer, group = site.layer, site.group
    rotated = any(has_online_rotation(lin) for lin in site.linears)
    if site.expert is not None:       # a fused block rotates its experts' down input without a Linear
        rotated = rotated or layer.moe.down_rotation(site.expert) is not None
    if rotated:
        raise ValueError(f"{transform}: layer {layer.index} has an online rotation on the input of {group}; "
                         f"apply {transform} before hadamard (or drop {group} from {transform}.roles)")


def width(source) -> int:
    """Input width of a statistics source (a module, or an expert's TensorRole)."""
    return source.weight.shape[1] if isinstance(source, nn.Module) else source.shape[1]


def statistics(model, sources: dict[str, object], tokens: torch.Tensor, batch_size: int = 8,
               hessian: bool = True) -> dict:
    """key → InputStats of each source's input over `tokens`, in one pass of the model: a module's over every
    token (models/calib.py), a routed expert matrix's over the rows its router sends it (models/moe.py
    ExpertStatistics, unweighted: GPTQ's per-expert statistics); `count` is then its routed rows (0: none)."""
    from quantatlas.models.calib import InputStats, input_statistics
    from quantatlas.models.moe import BoundMoE, ExpertStatistics, RoutingTap

    modules = {k: v for k, v in sources.items() if isinstance(v, nn.Module)}
    blocks: dict[int, tuple] = {}            # one accumulation per MoE block, over all its routed targets
    for k, t in sources.items():
        if not isinstance(t, nn.Module):
            blocks.setdefault(id(t.moe), (t.moe, {}))[1][k] = t
    experts = [ExpertStatistics(BoundMoE(moe), targets, hessian=hessian) for moe, targets in blocks.values()]
    taps = [RoutingTap(es.bound, es.add) for es in experts]
    try:
        out = input_statistics(model, modules, tokens, batch_size=batch_size, hessian=hessian)
    finally:
        for tap in taps:
            tap.remove()
    for es in experts:
        for k, d in es.result().items():
            out[k] = InputStats(d["hessian"], d["abs_mean"], d["sq_mean"], d["tokens"])
    return out


@no_grad
def fold(layer: _llama.Layer, group: str, s: torch.Tensor) -> None:
    """W_c ← W_c diag(s) for the consumers; the producer's output ← / s."""
    s = s.double()
    for lin in consumers(layer, group):
        _llama.scale_columns(lin, expand_scale(layer, group, s))
    if group == "qkv":
        _llama.scale_vector(layer.input_norm.weight, 1.0 / s)
    elif group == "gate_up":
        _llama.scale_vector(layer.post_norm.weight, 1.0 / s)
    elif group == "down":
        _llama.scale_rows(layer.up, 1.0 / s)
    elif group == "o":
        _llama.scale_rows(layer.v, 1.0 / s)


def positive(stat: torch.Tensor, rel_floor: float = 1e-8) -> torch.Tensor:
    """Clamp a non-negative statistic away from 0 (dead channels) so that stat^alpha is invertible."""
    stat = stat.double()
    return stat.clamp_min(max(float(stat.max()), 1e-30) * rel_floor)
