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
see the difference.

A model with a weight-bearing module we cannot name (an unknown Linear, an MoE router, fused
expert tensors) is refused with `UnmatchedModulesError` rather than silently left in fp:
the bit counts and the quantized model would both be wrong otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

# The layout owns the vocabulary and the structure queries; they are named here too, so a caller
# asks one module for roles (layer_prefix: the family's decoder list, else the largest list of blocks).
from quantatlas.models.layout import (MATRIX_KINDS, ROLES, TensorRole, UnmatchedModulesError, is_tied, layer_prefix,
                                      layout)

__all__ = ["ROLES", "MATRIX_KINDS", "SEQUENTIAL_ORDER", "TensorRole", "UnmatchedModulesError", "layer_prefix",
           "decoder_layers", "is_tied", "find_roles", "quantizable", "sequential_groups", "get_weight", "set_weight"]

# GPTQ's true-sequential order inside one decoder layer: a group's inputs are produced by
# the groups before it, so each group is calibrated on the outputs of already-quantized ones.
SEQUENTIAL_ORDER: tuple[tuple[str, ...], ...] = (("q", "k", "v", "qkv"), ("o",), ("gate", "up", "gate_up"), ("down",))


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
        group = sorted((t for t in matrices if t.role in group_roles), key=lambda t: group_roles.index(t.role))
        if group:
            groups.append(group)
    return groups


# ---- weights in [out, in] ----------------------------------------------------------------

def _weight(t: TensorRole) -> torch.Tensor:
    w = getattr(t.module, "weight", None)
    if w is None:
        raise ValueError(f"{t.name}: module {type(t.module).__name__} has no weight")
    return w


def get_weight(t: TensorRole) -> torch.Tensor:
    """A float32 copy of the weight in [out, in] (Conv1D's [in, out] transposed), on its device.

    A copy, so callers (GPTQ updates W in place) never write through to the model by accident.
    Norm and embedding weights come as stored (Gemma's norms hold w where the scale is 1 + w).
    """
    w = _weight(t).detach()
    if t.kind == "conv1d":
        w = w.t()
    return w.to(torch.float32, copy=True).contiguous()


@torch.no_grad()
def set_weight(t: TensorRole, w: torch.Tensor) -> None:
    """Write an [out, in] matrix (a norm: its 1-D vector) back in the module's own layout, dtype and device.

    For a tied head this also changes the token embedding: they are one tensor.
    """
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"set_weight({t.name}): w must be a torch.Tensor, got {type(w).__name__}")
    if tuple(w.shape) != tuple(t.shape):
        raise ValueError(f"set_weight({t.name}): w has shape {tuple(w.shape)}, expected {tuple(t.shape)} ([out, in])")
    target = _weight(t)
    target.copy_(w.t() if t.kind == "conv1d" else w)
