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
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from quantatlas._lazy import no_grad, torch
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
def _rotate_output(linear: nn.Linear, q: RandomizedHadamard) -> None:
    """W ← Q W, b ← Q b."""
    w = linear.weight
    w.copy_(q.rotate(w.double().T).T.to(w.dtype))
    if linear.bias is not None:
        _rotate_rows(linear.bias, q)


@no_grad
def fuse_norm_gains(model: nn.Module, layers: list[_llama.Layer]) -> None:
    """W ← W diag(γ), γ ← 1 for every RMSNorm and the linears it feeds (the head untied first)."""
    _llama.untie_head(model)
    pairs = [(layer.input_norm, (layer.q, layer.k, layer.v)) for layer in layers]
    pairs += [(layer.post_norm, (layer.gate, layer.up)) for layer in layers]
    pairs.append((_llama.final_norm(model), (_llama.head(model),)))
    for norm, readers in pairs:
        gain = norm.weight.detach().double().clone()
        for lin in readers:
            _llama.scale_columns(lin, gain)
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

    @no_grad
    def apply(self, model, calib_tokens=None, ctx: RunContext = RunContext()):
        from quantatlas.quant.online import OnlineRotation, attach_online_rotation, has_online_rotation

        layers = _llama.layers(model)
        # build (and so validate) every rotation before the first edit: an error leaves the model as it was
        residual = None
        if self.residual:
            residual = self._rotation(_llama.embedding(model).weight.shape[1], ctx.sub_seed("named", "residual"))
        online = []
        for layer in layers:
            for role in self.online:
                lin = getattr(layer, role)
                if has_online_rotation(lin):
                    raise ValueError(f"hadamard: layer {layer.index} {role}_proj is already rotated online")
                seed = ctx.sub_seed("named", "online", role, layer.index)
                online.append((lin, self._rotation(lin.in_features, seed)))
        if residual is not None:
            fuse_norm_gains(model, layers)
            _rotate_rows(_llama.embedding(model).weight, residual)
            _rotate_rows(_llama.head(model).weight, residual)
            for layer in layers:
                for lin in (layer.q, layer.k, layer.v, layer.gate, layer.up):
                    _rotate_rows(lin.weight, residual)
                _rotate_output(layer.o, residual)
                _rotate_output(layer.down, residual)
        if self.heads:
            for layer in layers:
                seed = ctx.sub_seed("named", "heads", layer.index)
                _rotate_heads(layer, RandomizedHadamard(layer.head_dim, seed))
        for lin, rotation in online:
            attach_online_rotation(lin, OnlineRotation(rotation))


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
