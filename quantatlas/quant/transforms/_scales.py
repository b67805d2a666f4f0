"""Diagonal input scales and where their inverse goes (shared by equalize and awq).

For a consumer group whose input x reaches the linears W_c, W_c ← W_c diag(s) while the op
that produced x is changed to produce x / s, so every W_c x is unchanged:

    qkv      x = input_layernorm(h)        γ1 ← γ1 / s
    gate_up  x = post_attention_layernorm  γ2 ← γ2 / s
    down     x = act(gate) ⊙ up            up rows (and bias) ← / s
    o        x = attention(v)              v rows (and bias) ← / s, per kv head

For `o`, query heads that share a kv head (GQA) see the same v channels, so s is chosen per
kv-head channel and repeated for every query head of the group; per-channel statistics of
o's input are averaged over those query heads first.
"""
from __future__ import annotations

from quantatlas._lazy import nn, no_grad, torch

from quantatlas.quant.transforms import _llama


def consumers(layer: _llama.Layer, group: str) -> list[nn.Linear]:
    return {"qkv": [layer.q, layer.k, layer.v], "gate_up": [layer.gate, layer.up],
            "o": [layer.o], "down": [layer.down]}[group]


def stat_module(layer: _llama.Layer, group: str) -> nn.Linear:
    """The linear whose input statistics describe the group's input."""
    return consumers(layer, group)[0]


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


def check_foldable(layer: _llama.Layer, group: str, transform: str) -> None:
    from quantatlas.quant.online import has_online_rotation

    for lin in consumers(layer, group):
        if has_online_rotation(lin):
            raise ValueError(f"{transform}: layer {layer.index} has an online rotation on the input of {group}; "
                             f"apply {transform} before hadamard (or drop {group} from {transform}.roles)")


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
