"""Tensor roles: which weight of a causal LM is a query, a key, an MLP gate, the head, a norm.

Roles are read by the model layout (`quantatlas.models.layout`, the one place that reads a
model's structure): a family adapter's module paths, else a matrix's own attribute name
(q_proj, c_attn, dense_4h_to_h, ...) together with what its parent is (an attention block, an
MLP block, or the decoder layer itself). The same name can mean different things in different
places: GPT-2's `c_proj` is `o` under `attn` and `down` under `mlp`; NeoX's `dense` is `o`
under `attention`. This module keeps the role vocabulary, weights in [out, in], and GPTQ's
true-sequential groups.

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

from dataclasses import dataclass, field

import torch
from torch import nn

ROLES: tuple[str, ...] = (
    "q", "k", "v", "o", "qkv",              # attention matrices (qkv: fused)
    "gate", "up", "down", "gate_up",         # MLP matrices (gate_up: fused)
    "head",                                  # lm_head (output embedding)
    "embed", "pos_embed",                    # token and learned position embeddings
    "norm", "q_norm", "k_norm",              # LayerNorm/RMSNorm; per-head query/key norms
)
MATRIX_KINDS = ("linear", "conv1d")

# GPTQ's true-sequential order inside one decoder layer: a group's inputs are produced by
# the groups before it, so each group is calibrated on the outputs of already-quantized ones.
SEQUENTIAL_ORDER: tuple[tuple[str, ...], ...] = (("q", "k", "v", "qkv"), ("o",), ("gate", "up", "gate_up"), ("down",))


class UnmatchedModulesError(ValueError):
    """Weight-bearing modules that have no role, or that claim a role another module has."""

    def __init__(self, model_class: str, unmatched: list[str], ambiguous: list[str] | None = None):
        self.model_class, self.unmatched, self.ambiguous = model_class, list(unmatched), list(ambiguous or [])
        parts = []
        if self.unmatched:
            parts.append(f"no tensor role for {len(self.unmatched)} weight-bearing module(s): "
                         + ", ".join(self.unmatched))
        if self.ambiguous:
            parts.append("ambiguous roles: " + "; ".join(self.ambiguous))
        super().__init__(f"{model_class}: " + "; ".join(parts)
                         + f" (known roles: {', '.join(ROLES)}; matrices must sit in an attention or MLP block)")


@dataclass
class TensorRole:
    name: str                 # module path, e.g. "model.layers.3.self_attn.k_proj"
    role: str                 # one of ROLES
    layer: int | None         # decoder layer index; None for embeddings, head, final norm
    module: nn.Module = field(repr=False)
    kind: str                 # "linear", "conv1d", "embedding", "norm"
    tied: bool = False        # head and token embedding share one weight (set on both)

    @property
    def shape(self) -> tuple[int, ...]:
        """[out, in] for matrices, [rows, dim] for embeddings, the weight's shape for norms."""
        w = getattr(self.module, "weight", None)
        if w is None:
            return ()
        if self.kind == "conv1d":
            return (w.shape[1], w.shape[0])
        return tuple(w.shape)


# ---- structure: asked of the model layout (quantatlas.models.layout) ------------------------

def layer_prefix(model: nn.Module) -> str:
    """Dotted path of the ModuleList of repeated decoder blocks, e.g. "model.layers".

    The family's own path (Llama's model.layers, GPT-2's transformer.h, ...); for other models
    the ModuleList of same-class blocks holding the most parameters (nested lists, such as MoE
    experts, hold fewer than the list that contains them); ties go to the shallower path.
    """
    from quantatlas.models.layout import layer_prefix as _layer_prefix

    return _layer_prefix(model)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks, in order."""
    return list(model.get_submodule(layer_prefix(model)))


def is_tied(model: nn.Module) -> bool:
    """True when the head's weight is the token embedding's weight (one tensor, stored once)."""
    from quantatlas.models.layout import is_tied as _is_tied

    return _is_tied(model)


def find_roles(model: nn.Module) -> list[TensorRole]:
    """Every role-bearing module, in model order. Raises UnmatchedModulesError on unknowns."""
    from quantatlas.models.layout import layout

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
