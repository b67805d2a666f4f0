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
token of x, since the one scale serves every expert whichever tokens it is routed. `down` (each
expert's up rows and down columns) is not done for experts and is refused.
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

    def scales(self, layer: _llama.Layer, group: str, act_max: torch.Tensor) -> torch.Tensor:
        """s per free scale of the group from the per-input-channel max |x|."""
        # the weights that get quantized: an MoE block's routers stay fp16, so they are scaled, not measured
        w_max = torch.stack([w.detach().abs().amax(0).double()
                             for w in _readers(layer, group, routers=False)]).amax(0)
        a = _scales.positive(_reduce_max(layer, group, act_max.double()))
        w = _scales.positive(_reduce_max(layer, group, w_max))
        return a ** self.alpha / w ** (1 - self.alpha)

    def check_model(self, model) -> list:
        """The layers it folds into (MoE ones included: the norm's fold reaches the router and every expert);
        refuses `roles: [down]` on MoE layers."""
        layers = _llama.layers(model, moe=True)
        if "down" in self.roles and any(layer.moe is not None for layer in layers):
            raise ValueError(f"transforms: smoothquant.roles down is not implemented for {type(model).__name__}'s "
                             "experts (each expert's up rows and down columns); use qkv, gate_up and o")
        return layers

    @no_grad
    def apply(self, model, calib_tokens, ctx=None):
        calib_tokens = check_calib("smoothquant", calib_tokens)
        layers = self.check_model(model)
        for layer in layers:
            for group in self.roles:
                if not _moe_mlp(layer, group):   # an MoE block has no online rotation: hadamard refuses MoE
                    _scales.check_foldable(layer, group, "smoothquant")
        act_max = input_absmax(model, {(layer.index, g): _stat_module(layer, g)
                                       for layer in layers for g in self.roles}, calib_tokens, self.batch_size)
        for layer in layers:
            for group in self.roles:
                s = self.scales(layer, group, act_max[(layer.index, group)])
                if _moe_mlp(layer, group):
                    for w in _readers(layer, group):
                        _llama.scale_matrix_columns(w, s)
                    _llama.scale_vector(layer.post_norm.weight, 1.0 / s)
                else:
                    _scales.fold(layer, group, s)


def _moe_mlp(layer: _llama.Layer, group: str) -> bool:
    return layer.moe is not None and group == "gate_up"


def _readers(layer: _llama.Layer, group: str, routers: bool = True) -> list[torch.Tensor]:
    """The [out, in] weights that read the group's input (for gate_up: every reader of post_attention_layernorm;
    `routers=False`: the quantized ones only)."""
    if group == "gate_up":
        return _llama.mlp_readers(layer, routers)
    return [lin.weight for lin in _scales.consumers(layer, group)]


def _stat_module(layer: _llama.Layer, group: str):
    """The module whose input is the group's input: in an MoE layer the router reads post_attention_layernorm."""
    return layer.moe.router if _moe_mlp(layer, group) else _scales.stat_module(layer, group)


@no_grad
def input_absmax(model, modules: dict, tokens: torch.Tensor, batch_size: int = 8) -> dict:
    """Per-channel max |input| of each module over `tokens` [n, seq] (one pass of the model)."""
    out: dict = {}
    handles = []

    def hook(key):
        def f(mod, args):
            m = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            out[key] = m if key not in out else torch.maximum(out[key], m)
        return f

    for key, m in modules.items():
        handles.append(m.register_forward_pre_hook(hook(key)))
    try:
        dev = next(model.parameters()).device
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i:i + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out
