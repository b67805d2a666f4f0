"""Tensor roles: which weight of a causal LM is a query, a key, an MLP gate, the head, a norm.

Roles are read by the model layout (`quantatlas.models.layout`, the one place that reads a
model's structure, which also defines the role vocabulary `ROLES`, `TensorRole` and
`UnmatchedModulesError`): a family adapter's module paths, else a matrix's own attribute name
(q_proj, c_attn, dense_4h_to_h, ...) together with what its parent is (an attention block, an
MLP block, or the decoder layer itself). The same name can mean different things in different
places: GPT-2's `c_proj` is `o` under `attn` and `down` under `mlp`; NeoX's `dense` is `o`
under `attention`. This module asks the layout for the roles, and keeps weights in [out, in]
and GPTQ's true-sequential groups.

Norms are tensors with roles too (`norm`, `q_norm`, `k_norm`, with their layer index), so an
override can address them; their weights come and go as the 1-D vector they are.

Everything is reported in [out, in] orientation. GPT-2's transformers `Conv1D` stores its
weight as [in, out] (y = x @ W + b); `get_weight`/`set_weight` transpose it so callers never
see the difference. A routed expert stored in a fused 3-D tensor (transformers' `experts.gate_up_proj`
[E, 2I, H]) is a TensorRole of kind "expert" whose weight is its own [out, in] slice: `weight_view`
is that slice of the model's tensor, `get_weight` a copy of it and `set_weight` writes it back, so a
solver quantizes each expert's matrix as a matrix of its own.

A model with a weight-bearing module we cannot name (an unknown Linear, the router or experts of an
MoE family the layout does not read) is refused with `UnmatchedModulesError` rather than silently left
in fp: the bit counts and the quantized model would both be wrong otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

# The layout owns the vocabulary and the structure queries; they are named here too, so a caller
# asks one module for roles (layer_prefix: the family's decoder list, else the largest list of blocks).
from quantatlas.models.layout import (MATRIX_KINDS, ROLES, TensorRole, UnmatchedModulesError, is_tied, layer_prefix,
                                      layout)

__all__ = ["ROLES", "MATRIX_KINDS", "SEQUENTIAL_ORDER", "TensorRole", "UnmatchedModulesError", "layer_prefix",
           "decoder_layers", "is_tied", "find_roles", "quantizable", "sequential_groups", "get_weight", "set_weight",
           "weight_view", "matrix_weights"]

# GPTQ's true-sequential order inside one decoder layer: a group's inputs are produced by
# the groups before it, so each group is calibrated on the outputs of already-quantized ones.
# An MoE block reads the attention's output in its router, its experts' gate/up and its shared
# expert's gate/up (one group), then each expert's down reads that expert's gate/up output.
SEQUENTIAL_ORDER: tuple[tuple[str, ...], ...] = (
    ("q", "k", "v", "qkv"), ("o",),
    ("gate", "up", "gate_up", "router", "expert_gate", "expert_up", "shared_expert_gate", "shared_expert_up",
     "shared_router"),
    ("down", "expert_down", "shared_expert_down"))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks, in order."""
    return list(model.get_submodule(layer_prefix(model)))


def find_roles(model: nn.Module) -> list[TensorRole]:
    """Every role-bearing module, in model order. Raises UnmatchedModulesError on unknowns."""
    return layout(model).check().roles


def quantizable(model: nn.Module, include_head: bool = False) -> list[TensorRole]:
    """The matrices (Linear/Conv1D), in model order; the head only if asked (it may be tied)."""
    return [t for t in find_roles(model)
            if t.kind in MATRIX_KINDS and (include_head or t.role != "head")]


def sequential_groups(roles_of_one_layer: list[TensorRole]) -> list[list[TensorRole]]:
    """Split one layer's matrices into GPTQ's true-sequential groups: [q,k,v|qkv], [o], [gate,up|gate_up|up], [down].

    Non-matrix roles (norms) are ignored; empty groups are left out.
    """
    matrices = [t for t in roles_of_one_layer if t.kind in MATRIX_KINDS]
    layers = {t.layer for t in matrices}
    if None in layers or len(layers) > 1:
        raise ValueError(f"sequential_groups: roles must come from one decoder layer, got layers {sorted(layers, key=str)}")
    groups = []
    for group_roles in SEQUENTIAL_ORDER:
        group = sorted((t for t in matrices if t.role in group_roles),
                       key=lambda t: (group_roles.index(t.role), -1 if t.expert is None else t.expert))
        if group:
            groups.append(group)
    return groups


# ---- weights in [out, in] ----------------------------------------------------------------

def weight_view(t: TensorRole) -> torch.Tensor:
    """The model's own tensor holding `t`'s weight, in the module's layout: `module.weight`, or one
    expert's slice of a fused 3-D expert tensor ([rows, in], or [in, rows] where it is stored transposed).
    A view: writing it writes the model."""
    if t.param is not None:
        p = getattr(t.module, t.param)[t.expert]
        return p[:, t.rows] if t.transposed else p[t.rows]
    w = getattr(t.module, "weight", None)
    if w is None:
        raise ValueError(f"{t.name}: module {type(t.module).__name__} has no weight")
    return w


def _transposed(t: TensorRole) -> bool:
    return t.kind == "conv1d" or t.transposed


def get_weight(t: TensorRole) -> torch.Tensor:
    """A float32 copy of the weight in [out, in] (Conv1D's [in, out] transposed), on its device.

    A copy, so callers (GPTQ updates W in place) never write through to the model by accident.
    Norm and embedding weights come as stored (Gemma's norms hold w where the scale is 1 + w).
    """
    w = weight_view(t).detach()
    if _transposed(t):
        w = w.t()
    return w.to(torch.float32, copy=True).contiguous()


def matrix_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.named_parameters()` as a dict, with every fused expert tensor split into its experts'
    matrices in place of the 3-D parameter (`<experts>.<e>.gate_proj.weight` ...: what a quantized run
    packs them as, each a view of the expert's [out, in] slice, or [in, out] where stored transposed)."""
    fused: dict[int, list[TensorRole]] = {}
    if any(p.dim() == 3 for p in model.parameters()):   # the layout is read only where experts may be fused
        for t in layout(model).roles:
            if t.kind == "expert":
                fused.setdefault(id(getattr(t.module, t.param)), []).append(t)
    out = {}
    for name, p in model.named_parameters():
        if id(p) in fused:
            out.update({t.name + ".weight": weight_view(t) for t in fused[id(p)]})
        else:
            out[name] = p
    return out


@torch.no_grad()
def set_weight(t: TensorRole, w: torch.Tensor) -> None:
    """Write an [out, in] matrix (a norm: its 1-D vector) back in the module's own layout, dtype and device.

    For a tied head this also changes the token embedding: they are one tensor.
    """
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"set_weight({t.name}): w must be a torch.Tensor, got {type(w).__name__}")
    if tuple(w.shape) != tuple(t.shape):
        raise ValueError(f"set_weight({t.name}): w has shape {tuple(w.shape)}, expected {tuple(t.shape)} ([out, in])")
    target = weight_view(t)
    target.copy_(w.t() if _transposed(t) else w)
