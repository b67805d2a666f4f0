"""Online rotations: a Linear whose input is rotated at run time (x ← Q x) with W ← W Qᵀ folded
in, so linear(x) is unchanged while its weights (and inputs) are in the rotated basis."""
from __future__ import annotations

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


@torch.no_grad()
def attach_online_rotation(linear: nn.Linear, rotation: OnlineRotation) -> None:
    """W ← W Qᵀ and rotate the input on every call, so linear(x) is unchanged."""
    if has_online_rotation(linear):
        raise ValueError("this linear already has an online rotation (apply hadamard once)")
    w = linear.weight
    w.copy_(rotation.rotation.rotate(w.double()).to(w.dtype))
    linear.input_rotation = rotation.to(w.device)
    linear.register_forward_pre_hook(_rotate_input_hook)
