"""Online rotations: a Linear whose input is rotated at run time (x ← Q x) with W ← W Qᵀ folded
in, so linear(x) is unchanged while its weights (and inputs) are in the rotated basis.

Mixture-of-experts blocks (`attach_expert_down_rotation`): every expert's down projection reads
act(gate x) ⊙ up x, made inside the block, so its rotation is online too; one Q per block, shared by
its experts. A ModuleList of expert MLPs has a Linear per down: each gets the hook above. Fused experts
(transformers 5: every expert's matrices in two 3-D tensors, one forward for all) have no module per
down to hook, so the experts module's class is swapped for a subclass (`DownRotatedExperts`) whose
forward rotates the down input, with Q in its child module `down_rotation`: a class and a child, not an
instance attribute, so a deep copy of the layer (GPTAQ's fp layer, layer replay) computes the same.
Parameter names and shapes are unchanged, so the layout, the weight step and exports read it as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantatlas.quant.hadamard import RandomizedHadamard


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


def rotates_expert_down(experts: nn.Module) -> bool:
    """Whether a fused experts module rotates its down input online (`DownRotatedExperts`)."""
    return isinstance(getattr(experts, "down_rotation", None), OnlineRotation)


def input_rotated(t) -> bool:
    """Whether the matrix of TensorRole `t` (models/layout.py) reads an input rotated online."""
    if t.kind == "expert":
        return t.role == "expert_down" and rotates_expert_down(t.module)
    return has_online_rotation(t.module)


def online_rotated(model: nn.Module) -> list[str]:
    """The modules of `model` that rotate an input online (Linears, fused experts' down): what a file format
    without run-time rotations cannot carry."""
    return [n for n, m in model.named_modules() if has_online_rotation(m) or rotates_expert_down(m)]


@torch.no_grad()
def attach_online_rotation(linear: nn.Linear, rotation: OnlineRotation) -> None:
    """W ← W Qᵀ and rotate the input on every call, so linear(x) is unchanged."""
    if has_online_rotation(linear):
        raise ValueError("this linear already has an online rotation (apply hadamard once)")
    w = linear.weight
    w.copy_(rotation.rotation.rotate(w.double()).to(w.dtype))
    linear.input_rotation = rotation.to(w.device)
    linear.register_forward_pre_hook(_rotate_input_hook)


# ---- mixture-of-experts blocks -------------------------------------------------------------------

@dataclass(frozen=True)
class FusedMatrices:
    """Where each expert's [out, in] matrices sit in a fused experts module's 3-D tensors, as the layout read
    them (models/layout.py, TensorRole.param/rows/transposed): plain data, carried by a deep copy."""
    n_experts: int
    where: tuple[tuple[str, str, slice, bool], ...]     # (role, parameter, rows, stored [E, in, out])

    @classmethod
    def of(cls, moe) -> FusedMatrices:
        roles = moe.experts[0] if moe.n_experts else {}
        return cls(moe.n_experts, tuple((r, t.param, t.rows, t.transposed) for r, t in roles.items()))

    def matrix(self, experts: nn.Module, expert: int, role: str) -> torch.Tensor:
        from quantatlas.models.moe import fused_matrix

        _, param, rows, transposed = next(w for w in self.where if w[0] == role)
        return fused_matrix(getattr(experts, param)[expert], rows, transposed)


class DownRotatedExperts(nn.Module):
    """Put before a fused experts class (`attach_expert_down_rotation`): its forward is the fused forward
    (models/moe.py, `experts_output`) with the down input rotated by the child `down_rotation`."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        from quantatlas.models.moe import experts_output

        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        where = self.fused_matrices
        out = experts_output(x, top_k_index.reshape(x.shape[0], -1), top_k_weights.reshape(x.shape[0], -1),
                             where.n_experts, lambda e, role: where.matrix(self, e, role), self.act_fn,
                             lambda e: self.down_rotation)
        return out.reshape(hidden_states.shape)


_ROTATED_CLASSES: dict[type, type] = {}


def _down_rotated_class(cls: type) -> type:
    """One subclass per fused experts class (so copies and isinstance checks agree)."""
    if cls not in _ROTATED_CLASSES:
        _ROTATED_CLASSES[cls] = type(cls.__name__, (DownRotatedExperts, cls), {"__module__": __name__})
    return _ROTATED_CLASSES[cls]


@torch.no_grad()
def attach_expert_down_rotation(bound, rotation: OnlineRotation, where: str = "") -> None:
    """Every routed expert's down of an MoE block (a models.moe.BoundMoE): W_e ← W_e Qᵀ, and its input
    act(gate x) ⊙ up x rotated x ← Q x at run time, so the block computes the same (module docstring).
    Refused when the block's down inputs are already rotated online."""
    moe, experts = bound.moe, bound.experts
    if any(bound.down_rotation(e) is not None for e in range(moe.n_experts)):
        raise ValueError(f"{where}the experts' down_proj input is already rotated online (apply it once)")
    if not moe.fused:
        for e in range(moe.n_experts):
            name = moe.experts[e]["expert_down"].name.rsplit(".", 1)[1]
            attach_online_rotation(experts[e].get_submodule(name), OnlineRotation(rotation.rotation))
        return
    q = rotation.rotation
    for e in range(moe.n_experts):
        w = bound.weight(e, "expert_down")          # a view ([H, I], or transposed): written through
        w.copy_(q.rotate(w.double()).to(w.dtype))
    experts.fused_matrices = FusedMatrices.of(moe)
    experts.down_rotation = rotation
    experts.__class__ = _down_rotated_class(type(experts))
