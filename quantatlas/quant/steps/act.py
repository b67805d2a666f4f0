"""Activations: the input of every Linear (or of the roles/layers named) through a codec, one row
per token, in every later forward pass (quant/act.py)."""
from __future__ import annotations

from quantatlas.quant.steps.base import RuntimeStep


class ActivationStep(RuntimeStep):
    field = "act"
    order = 60
    in_first_release = True

    def apply(self, state, ctx) -> None:
        from quantatlas.quant.act import ActivationQuantizer

        act = ActivationQuantizer(self.value, ctx.seed)
        act.attach(state.working_model(), state.recipe)  # each Linear's weight type, for llamacpp_cpu
        state.runtime_bits.append(lambda eval_ctx: act.bits())
