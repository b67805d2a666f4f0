"""Allocation: choose a codec per tensor group within a bit budget (quant/sensitivity.py measures,
quant/allocate.py chooses); the arm the later steps run is the arm with that choice as overrides."""
from __future__ import annotations

from quantatlas.quant.steps.base import Step, option_techniques


class AllocateStep(Step):
    field = "allocate"
    order = 10
    in_first_release = True

    def reads_calibration(self) -> bool:
        return True

    def seeded(self) -> bool:
        return self.value.assignment is None   # measured on the seed's calibration draw

    def needs_whole_model(self) -> str | None:
        return "sensitivity and allocation need the whole model"

    def techniques(self) -> set[str]:
        return {"allocate"} | option_techniques(self.value, "allocate")   # allocate.grouping=role

    def apply(self, state, ctx) -> None:
        from quantatlas.quant.sensitivity import allocated_arm

        state.arm, state.records["allocation"] = allocated_arm(state.lm, state.arm, state.calibration.tokens(ctx),
                                                               ctx.seed)
