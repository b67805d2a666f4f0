"""What every transform is: a function-preserving re-parametrisation applied to a model in place.

`apply(model, calib_tokens, seed)` edits the fp model so that its logits are unchanged (to fp
rounding) while the weights the solver will quantize become easier to quantize. Whatever is
random (rotation signs) comes from `seed`; `calib_tokens` [n, seq] feeds the transforms that
need activation statistics (equalize, awq) and is ignored by the others.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

from quantatlas._lazy import nn, torch

# One consumer group per input that can absorb a diagonal scale from the op before it.
ROLE_GROUPS = ("qkv", "gate_up", "o", "down")
RoleGroup = Literal["qkv", "gate_up", "o", "down"]


class Transform(ABC):
    name: ClassVar[str]

    def __init__(self, cfg=None):
        self.cfg = cfg

    @abstractmethod
    def apply(self, model: nn.Module, calib_tokens: torch.Tensor | None, seed: int = 0) -> None:
        """Edit `model` in place, keeping its function."""

    def config(self) -> dict[str, Any]:
        return {} if self.cfg is None else self.cfg.options()


def subseed(seed: int, *tags: object) -> int:
    """A seed for one rotation, derived from the experiment seed and a tag (stable across runs)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *tags))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_calib(transform: str, calib_tokens) -> torch.Tensor:
    if not isinstance(calib_tokens, torch.Tensor) or calib_tokens.dim() != 2 or calib_tokens.numel() == 0:
        raise ValueError(f"{transform} needs calibration tokens as a LongTensor [n, seq], got "
                         f"{type(calib_tokens).__name__}")
    return calib_tokens
