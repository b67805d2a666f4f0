"""Activations: the input of every Linear (or of the roles/layers named) through a codec, one row
per token, in every later forward pass (quant/act.py)."""
from __future__ import annotations

from quantatlas.quant.steps.base import RuntimeStep


class ActivationStep(RuntimeStep):
    field = "act"
    order = 60
    in_first_release = True

    def reads_calibration(self) -> bool:
        return self.value.static   # a static scale is calibrated on the calibration draw

    def seeded(self) -> bool:
        return self.value.seeded or self.reads_calibration()

    def needs_whole_model(self) -> str | None:
        return "static activation scales are calibrated on the whole model" if self.value.static else None

    def apply(self, state, ctx) -> None:
        from quantatlas.quant.act import ActivationQuantizer

        act = ActivationQuantizer(self.value, ctx.seed)
        act.attach(state.working_model(), state.recipe)  # each Linear's weight type, for llamacpp_cpu
        if self.value.static:
            act.calibrate(state.working_model(), state.calibration.tokens(ctx))
            # each Linear's calibrated input amax: what an export stores as its static input scale
            state.records["act_static_amax"] = {s["name"]: float(s["codec"].tensor_amax)
                                                for s in act.slots if s["codec"].tensor_amax is not None}
        state.runtime_bits.append(lambda eval_ctx: act.bits())
