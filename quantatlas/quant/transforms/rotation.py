"""Randomized Hadamard rotations (QuaRot-style), folded into the weights or applied online.

Q = H·diag(±1)/√b per block of width b (the full width when block is null), signs from the
experiment seed. Three places, each keeping the fp function:

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

import torch
from torch import nn

from quantatlas.quant.hadamard import RandomizedHadamard
from quantatlas.quant.transforms import _llama, register
from quantatlas.quant.transforms.base import Transform, subseed

ONLINE_ROLES = ("o", "down")


class OnlineRotation(nn.Module):
    """x ↦ Q x on the last dim, computed in fp32 and returned in x's dtype."""

    def __init__(self, rotation: RandomizedHadamard):
        super().__init__()
        self.rotation = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation.rotate(x.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.rotation.size}, block={self.rotation.block}, seed={self.rotation.seed}"


def _rotate_input_hook(module: nn.Module, args):
    return (module.input_rotation(args[0]),) + tuple(args[1:])


def has_online_rotation(linear: nn.Module) -> bool:
    return isinstance(getattr(linear, "input_rotation", None), OnlineRotation)


@torch.no_grad()
def attach_online_rotation(linear: nn.Linear, rotation: OnlineRotation) -> None:
    """W ← W Qᵀ and rotate the input on every call, so linear(x) is unchanged."""
    if has_online_rotation(linear):
        raise ValueError("this linear already has an online rotation (apply hadamard once)")
    w = linear.weight
    w.copy_(rotation.rotation.rotate(w.double()).to(w.dtype))
    linear.input_rotation = rotation.to(w.device)
    linear.register_forward_pre_hook(_rotate_input_hook)


@torch.no_grad()
def _rotate_rows(p: torch.Tensor, q: RandomizedHadamard) -> None:
    """Rows r ← Q r (a matrix read as row vectors: W ← W Qᵀ; a vector: b ← Q b)."""
    p.copy_(q.rotate(p.double()).to(p.dtype))


@torch.no_grad()
def _rotate_output(linear: nn.Linear, q: RandomizedHadamard) -> None:
    """W ← Q W, b ← Q b."""
    w = linear.weight
    w.copy_(q.rotate(w.double().T).T.to(w.dtype))
    if linear.bias is not None:
        _rotate_rows(linear.bias, q)


@torch.no_grad()
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


@register
class HadamardRotation(Transform):
    name = "hadamard"

    def __init__(self, residual: bool = True, heads: bool = True, online=("down",), block: int | None = None):
        for field, value in (("residual", residual), ("heads", heads)):
            if not isinstance(value, bool):
                raise ValueError(f"hadamard.{field} must be true or false, got {value!r}")
        if isinstance(online, str) or not all(r in ONLINE_ROLES for r in online):
            raise ValueError(f"hadamard.online must be a list drawn from {', '.join(ONLINE_ROLES)}, got {online!r}")
        if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
            raise ValueError(f"hadamard.block must be a positive integer or null (full width), got {block!r}")
        self.residual, self.heads, self.online, self.block = residual, heads, tuple(online), block

    def config(self):
        return {"residual": self.residual, "heads": self.heads, "online": list(self.online), "block": self.block}

    def _rotation(self, size: int, seed: int) -> RandomizedHadamard:
        try:
            return RandomizedHadamard(size, seed, self.block)
        except ValueError as e:
            raise ValueError(f"hadamard: width {size}: {e}") from None

    @torch.no_grad()
    def apply(self, model, calib_tokens=None, seed=0):
        layers = _llama.layers(model)
        # build (and so validate) every rotation before the first edit: an error leaves the model as it was
        residual = None
        if self.residual:
            residual = self._rotation(_llama.embedding(model).weight.shape[1], subseed(seed, "residual"))
        online = []
        for layer in layers:
            for role in self.online:
                lin = getattr(layer, role)
                if has_online_rotation(lin):
                    raise ValueError(f"hadamard: layer {layer.index} {role}_proj is already rotated online")
                online.append((lin, self._rotation(lin.in_features, subseed(seed, "online", role, layer.index))))
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
                _rotate_heads(layer, RandomizedHadamard(layer.head_dim, subseed(seed, "heads", layer.index)))
        for lin, rotation in online:
            attach_online_rotation(lin, OnlineRotation(rotation))


@torch.no_grad()
def _rotate_heads(layer: _llama.Layer, qh: RandomizedHadamard) -> None:
    """v_proj rows of each kv head ← Q_h ·, o_proj columns of each query head ← · Q_hᵀ."""
    hd, n_kv, n_heads = layer.head_dim, layer.n_kv_heads, layer.n_heads
    v = layer.v.weight                                                    # [n_kv·hd, hidden]
    v.copy_(qh.rotate(v.double().reshape(n_kv, hd, -1).transpose(1, 2)).transpose(1, 2).reshape(v.shape).to(v.dtype))
    if layer.v.bias is not None:
        _rotate_rows(layer.v.bias.view(n_kv, hd), qh)
    o = layer.o.weight                                                    # [hidden, n_heads·hd]
    o.copy_(qh.rotate(o.double().reshape(-1, n_heads, hd)).reshape(o.shape).to(o.dtype))
