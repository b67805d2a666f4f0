"""Randomized Hadamard rotations (QuaRot-style), folded into the weights or applied online.

Q = H·diag(±1)/√b per block of width b (the full width when block is null), signs from the
run context (`ctx.sub_seed("named", place...)`). Three places, each keeping the fp function:

residual  The residual stream h becomes Q h. RMSNorm commutes with Q once its gain is moved
          into the linears it feeds (rms(Q h) = rms(h)), so first W ← W diag(γ), γ ← 1 for
          q/k/v (input_layernorm), gate/up (post_attention_layernorm) and the head (final norm).
          Then every reader of the stream takes W ← W Qᵀ (q, k, v, gate, up, head; embedding
          rows likewise), every writer W ← Q W, b ← Q b (o, down). A tied head is untied.
heads     The value path per head: v_proj's rows of head h become Q_h v (Q_h of width head_dim),
          o_proj's columns of every query head W_o,h ← W_o,h Q_hᵀ. Softmax mixes tokens, not
          channels, so the rotation passes through attention.
online    For o/down: W ← W Qᵀ and a forward pre-hook rotates the input x ← Q x at run time
          (the input is made by a nonlinearity, so there is nothing to fold into). The module
          stays an nn.Linear at its own name; the hook and its signs live in a child module
          `input_rotation`. Calibration hooks registered later see the rotated input.

Mixture of experts (`_llama.mlp_readers`): post_attention_layernorm's output is read by the router, every
expert's gate and up and a shared expert's gate, up and router, so its gain goes into all of them and all
take W ← W Qᵀ (the routers too: router logits, hence the routing, are unchanged); every expert's down and a
shared expert's down write the stream, W ← Q W. Online `down` rotates each expert's down input with one Q
per layer shared by its experts (the dense down's seed), and a shared expert's down with its own
(quant/online.py: a fused experts module's forward rotates it; a ModuleList's Linears are hooked).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from quantatlas._lazy import nn, no_grad, torch
from quantatlas.context import RunContext
from quantatlas.quant.config import TransformConfig
from quantatlas.quant.hadamard import RandomizedHadamard
from quantatlas.quant.transforms import _llama
from quantatlas.quant.transforms.base import Transform

@no_grad
def _rotate_rows(p: torch.Tensor, q: RandomizedHadamard) -> None:
    """Rows r ← Q r (a matrix read as row vectors: W ← W Qᵀ; a vector: b ← Q b)."""
    p.copy_(q.rotate(p.double()).to(p.dtype))


@no_grad
def _rotate_columns(w: torch.Tensor, q: RandomizedHadamard) -> None:
    """W ← Q W on an [out, in] tensor (a view into a fused expert tensor too)."""
    w.copy_(q.rotate(w.double().T).T.to(w.dtype))


@no_grad
def _rotate_output(linear: nn.Linear, q: RandomizedHadamard) -> None:
    """W ← Q W, b ← Q b."""
    _rotate_columns(linear.weight, q)
    if linear.bias is not None:
        _rotate_rows(linear.bias, q)


def stream_writers(layer: _llama.Layer) -> list[nn.Linear | torch.Tensor]:
    """What writes the residual stream besides o_proj: the dense down_proj, or every expert's down [hidden,
    inter] (views) and a shared expert's down_proj."""
    if layer.moe is None:
        return [layer.down]
    bound, moe = layer.moe, layer.moe.moe
    out = [bound.weight(e, "expert_down") for e in range(moe.n_experts)]
    return out + ([moe.shared["shared_expert_down"].module] if "shared_expert_down" in moe.shared else [])


@no_grad
def fuse_norm_gains(model: nn.Module, layers: list[_llama.Layer]) -> None:
    """W ← W diag(γ), γ ← 1 for every RMSNorm and the linears it feeds (the head untied first)."""
    _llama.untie_head(model)
    pairs = [(layer.input_norm, [lin.weight for lin in (layer.q, layer.k, layer.v)]) for layer in layers]
    pairs += [(layer.post_norm, _llama.mlp_readers(layer)) for layer in layers]
    pairs.append((_llama.final_norm(model), [_llama.head(model).weight]))
    for norm, readers in pairs:
        gain = norm.weight.detach().double().clone()
        for w in readers:
            _llama.scale_matrix_columns(w, gain)
        norm.weight.fill_(1.0)


class HadamardConfig(TransformConfig):
    name = "hadamard"
    seeded = True
    residual: bool = True
    heads: bool = True
    online: list[Literal["o", "down"]] = ["down"]
    block: int | None = Field(None, ge=1)   # null: the full width

    def build(self):
        return HadamardRotation(self)


class HadamardRotation(Transform):
    name = "hadamard"

    def __init__(self, cfg: HadamardConfig):
        super().__init__(cfg)
        self.residual, self.heads, self.online, self.block = cfg.residual, cfg.heads, tuple(cfg.online), cfg.block

    def _rotation(self, size: int, seed: int) -> RandomizedHadamard:
        try:
            return RandomizedHadamard(size, seed, self.block)
        except ValueError as e:
            raise ValueError(f"hadamard: width {size}: {e}") from None

    def check_model(self, model) -> None:
        """Refuses what `apply` refuses (the layout, a width without a Hadamard matrix, a rotated input)."""
        self._online(model, _llama.layers(model), RunContext())

    def _online(self, model, layers: list[_llama.Layer], ctx: RunContext) -> list[tuple]:
        """(what, rotation) per online rotation: what is a Linear or an MoE layer's BoundMoE (every expert's
        down); built, and so validated, before any edit."""
        return online_rotations(layers, self.online, ctx, self._rotation, "hadamard: ")

    @no_grad
    def apply(self, model, calib_tokens=None, ctx: RunContext = RunContext()):
        layers = _llama.layers(model)
        # build (and so validate) every rotation before the first edit: an error leaves the model as it was
        residual = None
        if self.residual:
            residual = self._rotation(_llama.embedding(model).weight.shape[1], ctx.sub_seed("named", "residual"))
        online = self._online(model, layers, ctx)
        if residual is not None:
            fuse_norm_gains(model, layers)
            _rotate_rows(_llama.embedding(model).weight, residual)
            _rotate_rows(_llama.head(model).weight, residual)
            for layer in layers:
                for w in (layer.q.weight, layer.k.weight, layer.v.weight, *_llama.mlp_readers(layer)):
                    _rotate_rows(w, residual)
                for writer in (layer.o, *stream_writers(layer)):
                    if isinstance(writer, torch.Tensor):
                        _rotate_columns(writer, residual)
                    else:
                        _rotate_output(writer, residual)
        if self.heads:
            for layer in layers:
                seed = ctx.sub_seed("named", "heads", layer.index)
                _rotate_heads(layer, RandomizedHadamard(layer.head_dim, seed))
        attach_online(online)


def online_rotations(layers: list[_llama.Layer], roles, ctx: RunContext, make, where: str) -> list[tuple]:
    """(target, RandomizedHadamard) of every online rotation `roles` ("o", "down") asks for: a Linear, or an MoE
    layer's BoundMoE for its experts' down (one rotation per layer, the dense down's seed) plus a shared expert's
    down_proj (its own seed). `make(size, seed)` builds a rotation; inputs rotated already are refused."""
    from quantatlas.quant.online import has_online_rotation

    out = []
    for layer in layers:
        for role in roles:
            seed = ctx.sub_seed("named", "online", role, layer.index)
            if role == "o" or layer.moe is None:
                lin = getattr(layer, role)
                if has_online_rotation(lin):
                    raise ValueError(f"{where}layer {layer.index} {role}_proj is already rotated online")
                out.append((lin, make(lin.in_features, seed)))
                continue
            bound = layer.moe
            if any(bound.down_rotation(e) is not None for e in range(bound.moe.n_experts)):
                raise ValueError(f"{where}layer {layer.index} experts' down_proj is already rotated online")
            if bound.moe.n_experts:
                out.append((bound, make(bound.weight(0, "expert_down").shape[1], seed)))
            shared = bound.moe.shared.get("shared_expert_down")
            if shared is not None:
                if has_online_rotation(shared.module):
                    raise ValueError(f"{where}layer {layer.index} shared_expert.down_proj is already rotated online")
                seed = ctx.sub_seed("named", "online", "shared_expert_down", layer.index)
                out.append((shared.module, make(shared.module.in_features, seed)))
    return out


@no_grad
def attach_online(online: list[tuple]) -> None:
    """Attach the rotations `online_rotations` built: W ← W Qᵀ and the input rotated at run time."""
    from quantatlas.quant.online import OnlineRotation, attach_expert_down_rotation, attach_online_rotation

    for target, rotation in online:
        if isinstance(target, nn.Module):
            attach_online_rotation(target, OnlineRotation(rotation))
        else:
            attach_expert_down_rotation(target, OnlineRotation(rotation))


@no_grad
def _rotate_heads(layer: _llama.Layer, qh: RandomizedHadamard) -> None:
    """v_proj rows of each kv head ← Q_h ·, o_proj columns of each query head ← · Q_hᵀ."""
    hd, n_kv, n_heads = layer.head_dim, layer.n_kv_heads, layer.n_heads
    v = layer.v.weight                                                    # [n_kv·hd, hidden]
    v.copy_(qh.rotate(v.double().reshape(n_kv, hd, -1).transpose(1, 2)).transpose(1, 2).reshape(v.shape).to(v.dtype))
    if layer.v.bias is not None:
        _rotate_rows(layer.v.bias.view(n_kv, hd), qh)
    o = layer.o.weight                                                    # [hidden, n_heads·hd]
    o.copy_(qh.rotate(o.double().reshape(-1, n_heads, hd)).reshape(o.shape).to(o.dtype))
