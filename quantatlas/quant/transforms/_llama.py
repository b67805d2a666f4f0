"""The pre-norm decoder layout that function-preserving folds rely on (Llama, Mistral, Qwen2/3, ...).

    h ← h + o_proj(attn(q_proj(n1(h)), k_proj(n1(h)), v_proj(n1(h))))     n1 = input_layernorm
    h ← h + down_proj(act(gate_proj(n2(h))) ⊙ up_proj(n2(h)))               n2 = post_attention_layernorm
    logits = lm_head(norm(h))

with RMSNorms computing weight ⊙ x / rms(x) (no bias, no 1 + weight). A fold moves a diagonal or
orthogonal factor across one of these edges, so a model with another layout (post-norms,
fused qkv, Gemma's 1 + w norms, LayerNorm with mean subtraction) is refused rather than
silently changed into a different function.

A mixture-of-experts layer (`Layer.moe`; gate/up/down are then None) has many readers of n2(h): the
router, every expert's gate and up, and a shared expert's gate, up and router where the family has one
(`mlp_readers`), and many writers into h (every expert's down, a shared expert's down). A fold on n2 or
on h reaches all of them; the routers are folded too, so the routing is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from quantatlas._lazy import nn, no_grad, torch


@dataclass
class Layer:
    index: int
    input_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    post_norm: nn.Module
    gate: nn.Linear | None          # None in an MoE layer (see `moe`)
    up: nn.Linear | None
    down: nn.Linear | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    moe: object = None              # models.moe.BoundMoE of an MoE layer, else None

    def linears(self) -> dict[str, nn.Linear]:
        out = {"q": self.q, "k": self.k, "v": self.v, "o": self.o, "gate": self.gate, "up": self.up, "down": self.down}
        return {k: v for k, v in out.items() if v is not None}


def mlp_readers(layer: Layer, routers: bool = True) -> list[torch.Tensor]:
    """Every [out, in] weight that reads post_attention_layernorm's output (views of the model's tensors):
    a dense MLP's gate and up; in an MoE layer the router, each expert's gate and up (slices of the fused
    3-D tensor or the ModuleList's Linears), and the shared expert's gate, up and router where there is one.
    `routers=False` leaves the routers out (kept in fp16: a fold must scale them, a weight statistic not read them)."""
    if layer.moe is None:
        return [layer.gate.weight, layer.up.weight]
    bound, moe = layer.moe, layer.moe.moe
    out = [bound.router.weight] if routers else []
    for e in range(moe.n_experts):
        out += [bound.weight(e, "expert_gate"), bound.weight(e, "expert_up")]
    out += [moe.shared[r].module.weight for r in ("shared_expert_gate", "shared_expert_up", "shared_router")
            if r in moe.shared and (routers or r != "shared_router")]
    return out


def _refuse(model: nn.Module, what: str) -> ValueError:
    return ValueError(f"{type(model).__name__}: {what}; rotations, equalization and AWQ support pre-norm "
                      f"Llama/Qwen-style decoders (input_layernorm → q/k/v, post_attention_layernorm → gate/up, "
                      f"RMSNorm = weight ⊙ x / rms(x))")


@no_grad
def _check_rmsnorm(model: nn.Module, norm: nn.Module, where: str) -> None:
    """The norm must compute weight ⊙ x / rms(x): checked on a random input (a behaviour, not a class name)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise _refuse(model, f"{where} is {type(norm).__name__}, not an RMSNorm with a gain vector")
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)) or 0.0
    want = w * x / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(w)
    if not torch.allclose(norm(x), want, rtol=1e-3, atol=1e-4):
        raise _refuse(model, f"{where} ({type(norm).__name__}) does not compute weight ⊙ x / rms(x)")


def layers(model: nn.Module) -> list[Layer]:
    """The decoder layers as folds see them (MoE layers with `moe` set), read from the model layout; other
    layouts are refused."""
    from quantatlas.models.layout import layout
    from quantatlas.models.moe import BoundMoE

    out = []
    m = layout(model)
    for layer in m.layers:
        i = layer.index
        dense = layer.moe is None
        mlp = ("gate", "up", "down") if dense else ()
        parts = {
            "input_norm": layer.module("attn_norm"),
            "post_norm": layer.module("ffn_norm"),
            **{p: layer.module(p) for p in ("q", "k", "v", "o", *mlp)},
        }
        missing = [k for k, v in parts.items() if v is None]
        if missing:
            raise _refuse(model, f"layer {i} lacks {', '.join(missing)}")
        extra = [t.name[len(layer.name) + 1:] for position, t in layer.norms.items()
                 if position not in ("attn_norm", "ffn_norm", "q_norm", "k_norm")]
        if extra:
            raise _refuse(model, f"layer {i} has other norms ({', '.join(extra)})")
        for name in ("q", "k", "v", "o", *mlp):
            if not isinstance(parts[name], nn.Linear):
                raise _refuse(model, f"layer {i} {name}_proj is {type(parts[name]).__name__}, not nn.Linear")
        _check_rmsnorm(model, parts["input_norm"], f"layer {i} input_layernorm")
        _check_rmsnorm(model, parts["post_norm"], f"layer {i} post_attention_layernorm")
        parts.update({p: None for p in ("gate", "up", "down") if p not in parts})
        out.append(Layer(i, n_heads=layer.n_heads, n_kv_heads=layer.n_kv_heads, head_dim=layer.head_dim,
                         moe=None if dense else BoundMoE(layer.moe), **parts))
    return out


def embedding(model: nn.Module) -> nn.Embedding:
    from quantatlas.models.layout import layout

    embed = layout(model).embed
    if embed is None:
        raise _refuse(model, "no token embedding")
    return embed.module


def head(model: nn.Module) -> nn.Linear:
    from quantatlas.models.layout import layout

    h = layout(model).head
    if h is None or not isinstance(h.module, nn.Linear):
        raise _refuse(model, "no nn.Linear output head")
    return h.module


def final_norm(model: nn.Module) -> nn.Module:
    from quantatlas.models.layout import layout

    norm = layout(model).final_norm
    if norm is None:
        raise _refuse(model, "no final norm")
    _check_rmsnorm(model, norm.module, "the final norm")
    return norm.module


@no_grad
def untie_head(model: nn.Module) -> None:
    """Give the head its own weight tensor when it shares the embedding's (folds must differ)."""
    h, e = head(model), embedding(model)
    if h.weight is e.weight or h.weight.data_ptr() == e.weight.data_ptr():
        h.weight = nn.Parameter(e.weight.detach().clone(), requires_grad=e.weight.requires_grad)
        if getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False


# ---- in-place weight edits in float64 ------------------------------------------------------------

@no_grad
def scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    """W ← W diag(s) (the input channel j is multiplied by s_j)."""
    scale_matrix_columns(linear.weight, s)


@no_grad
def scale_matrix_columns(w: torch.Tensor, s: torch.Tensor) -> None:
    """W ← W diag(s) on an [out, in] tensor, in place (a view into a fused expert tensor too)."""
    w.copy_((w.double() * s.double().to(w.device)[None, :]).to(w.dtype))


@no_grad
def scale_rows(linear: nn.Linear, s: torch.Tensor) -> None:
    """W ← diag(s) W, b ← s ⊙ b (the output channel i is multiplied by s_i)."""
    w = linear.weight
    s = s.double().to(w.device)
    w.copy_((w.double() * s[:, None]).to(w.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() * s).to(linear.bias.dtype))


@no_grad
def scale_vector(p: torch.Tensor, s: torch.Tensor) -> None:
    p.copy_((p.double() * s.double().to(p.device)).to(p.dtype))
