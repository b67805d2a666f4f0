"""What every transform is: a function-preserving re-parametrisation applied to a model in place.

`apply(model, calib_tokens, ctx)` edits the fp model so that its logits are unchanged (to fp
rounding) while the weights the solver will quantize become easier to quantize. Whatever is
random (rotation signs) comes from the run context `ctx` (a rotation named by its place draws
`ctx.sub_seed("named", ...)`); `calib_tokens` [n, seq] feeds the transforms that need activation
statistics (equalize, awq) and is ignored by the others.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

from quantatlas._lazy import nn, torch
from quantatlas.context import RunContext

# One consumer group per input that can absorb a diagonal scale from the op before it.
ROLE_GROUPS = ("qkv", "gate_up", "o", "down")
RoleGroup = Literal["qkv", "gate_up", "o", "down"]


class Transform(ABC):
    name: ClassVar[str]

    def __init__(self, cfg=None):
        self.cfg = cfg

    @abstractmethod
    def apply(self, model: nn.Module, calib_tokens: torch.Tensor | None, ctx: RunContext = RunContext()) -> None:
        """Edit `model` in place, keeping its function."""

    def check_model(self, model: nn.Module) -> None:
        """Refuse (the ValueError `apply` would raise) a model whose layers this transform cannot fold into,
        without editing it: the arm is refused before any arm runs. Every transform here folds into
        Llama/Qwen-style layers, dense or mixture-of-experts (_llama.py)."""
        from quantatlas.quant.transforms import _llama

        _llama.layers(model)

    def config(self) -> dict[str, Any]:
        return {} if self.cfg is None else self.cfg.options()


def check_calib(transform: str, calib_tokens) -> torch.Tensor:
    if not isinstance(calib_tokens, torch.Tensor) or calib_tokens.dim() != 2 or calib_tokens.numel() == 0:
        raise ValueError(f"{transform} needs calibration tokens as a LongTensor [n, seq], got "
                         f"{type(calib_tokens).__name__}")
    return calib_tokens
