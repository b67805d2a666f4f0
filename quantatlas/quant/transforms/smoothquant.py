"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights with a per-channel
scale folded into the op that produces the activation.

For each consumer group (default q/k/v after input_layernorm, gate/up after
post_attention_layernorm), over the calibration tokens:

    s_j = max|X_j|^α / max|W_j|^(1−α)        X_j: input channel j, W_j: column j of the group's weights

then X ← X diag(s)⁻¹ (the RMSNorm gain γ ← γ / s) and W ← W diag(s), so every W x is unchanged
(see _scales.py for where 1/s goes; o and down may be asked for too: 1/s goes into v_proj's rows,
per kv head, or up_proj's rows). α = 0.5 is the paper's default; α → 1 pushes all of the
activation range into the weights, α = 0 only flattens the weights. Statistics are the max over
every calibration token (the paper's 512 samples; here `data.calib`); for `o` the max over the
query heads that share a kv head.

Mixture of experts: post_attention_layernorm's output x is read by the router, every expert's gate and
up, and a shared expert's gate, up and router (Qwen2-MoE). One s on x must then go into the columns of
all of them (the router's too, so its logits and the routing are unchanged), and max|W_j| is the max
over all of them, as for the fused readers of one input (a dense gate and up). max|X_j| is over every
token of x, since the one scale serves every expert whichever tokens it is routed. `down`: each expert
e gets its own s_e on its down input act(gate_e x) ⊙ up_e x (up_e rows ← / s_e, down_e columns ← × s_e),
with max|X_j| over the rows its router sends it (unweighted) and max|W_j| over down_e's column j; a
shared expert is a dense MLP on every token. An expert no calibration token was routed to keeps s_e = 1.
"""
from __future__ import annotations

from pydantic import Field

from quantatlas._lazy import no_grad, torch
from quantatlas.quant.config import TransformConfig
from quantatlas.quant.transforms import _llama, _scales
from quantatlas.quant.transforms.base import RoleGroup, Transform, check_calib


class SmoothQuantConfig(TransformConfig):
    name = "smoothquant"
    alpha: float = Field(0.5, ge=0, le=1, allow_inf_nan=False)
    roles: list[RoleGroup] = ["qkv", "gate_up"]

    def build(self):
        return SmoothQuant(self)


def _reduce_max(layer: _llama.Layer, group: str, stat: torch.Tensor) -> torch.Tensor:
    """Per input channel → per free scale: for o the max over the query heads of each kv head."""
    if group != "o":
        return stat
    rep = layer.n_heads // layer.n_kv_heads
    return stat.reshape(layer.n_kv_heads, rep, layer.head_dim).amax(1).reshape(-1)


class SmoothQuant(Transform):
    name = "smoothquant"
    batch_size = 8

    def __init__(self, cfg: SmoothQuantConfig):
        super().__init__(cfg)
        self.alpha, self.roles = cfg.alpha, tuple(dict.fromkeys(cfg.roles))

    def scales(self, site: _scales.Site, act_max: torch.Tensor) -> torch.Tensor:
        """s per free scale of a site from the per-input-channel max |x|."""
        # the weights that get quantized: an MoE block's routers stay fp16, so they are scaled, not measured
        w_max = torch.stack([w.detach().abs().amax(0).double() for w, _ in site.quantized]).amax(0)
        a = _scales.positive(_reduce_max(site.layer, site.group, act_max.double()))
        w = _scales.positive(_reduce_max(site.layer, site.group, w_max))
        return a ** self.alpha / w ** (1 - self.alpha)

    @no_grad
    def apply(self, model, calib_tokens, ctx=None):
        calib_tokens = check_calib("smoothquant", calib_tokens)
        sites = [site for layer in _llama.layers(model) for g in self.roles for site in _scales.sites(layer, g)]
        for site in sites:
            _scales.check_foldable(site, "smoothquant")
        sources = {site.key: site.sources[site.key] for site in sites}
        act_max = input_absmax(model, {k: m for k, m in sources.items() if isinstance(m, torch.nn.Module)},
                               calib_tokens, self.batch_size,
                               routed={k: t for k, t in sources.items() if not isinstance(t, torch.nn.Module)})
        for site in sites:
            if site.key in act_max:      # absent: an expert no calibration token was routed to keeps s = 1
                site.fold(self.scales(site, act_max[site.key]))


@no_grad
def input_absmax(model, modules: dict, tokens: torch.Tensor, batch_size: int = 8, routed: dict | None = None) -> dict:
    """Per-channel max |input| of each module over `tokens` [n, seq] (one pass of the model). `routed`: key →
    a routed expert's TensorRole (models/layout.py), the max over the rows its router sends it of what that
    matrix reads (its down: the hidden act(gate x) ⊙ up x); a key no row reached is left out."""
    from quantatlas.models.moe import BoundMoE, RoutingTap

    out: dict = {}
    handles = []

    def update(key, m):
        out[key] = m if key not in out else torch.maximum(out[key], m)

    def hook(key):
        def f(mod, args):
            update(key, args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float())
        return f

    def tap(bound, targets):
        def f(routing):
            for key, t in targets.items():
                tok, _ = routing.rows_of(t.expert)
                if tok.numel():
                    x = routing.x[tok].float()
                    x = bound.hidden(t.expert, x) if t.role == "expert_down" else x
                    update(key, x.abs().amax(0))
        return f

    for key, m in modules.items():
        handles.append(m.register_forward_pre_hook(hook(key)))
    blocks: dict[int, tuple] = {}
    for key, t in (routed or {}).items():
        blocks.setdefault(id(t.moe), (t.moe, {}))[1][key] = t
    for moe, targets in blocks.values():
        bound = BoundMoE(moe)
        handles.append(RoutingTap(bound, tap(bound, targets)))
    try:
        dev = next(model.parameters()).device
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i:i + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out
