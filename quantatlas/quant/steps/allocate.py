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

    def check_model(self, lm) -> None:
        """A candidate (or assigned) codec whose group or block does not divide the columns of a matrix the
        allocation may give it (every one the arm's own codec quantizes) is refused before any arm runs."""
        from quantatlas.errors import UserError
        from quantatlas.quant.quantize import planned_matrices

        a = self.value
        codecs = [(c, f"{self.where}.allocate.candidates.{j}") for j, c in enumerate(a.candidates)]
        codecs += [(c, f"{self.where}.allocate.assignment.{g}") for g, c in (a.assignment or {}).items()]
        recipe, plans = planned_matrices(self.arm, lm.model, self.where)
        plans = [p for p in plans if p.codec is recipe.codec]     # what the allocation may reassign
        for cfg, field in codecs:
            codec = cfg.build()
            for p in plans:
                try:
                    codec.group_of(p.target.shape[1])
                except ValueError as e:
                    raise UserError(f"{field}: {p.name}: {e}", field) from None

    def apply(self, state, ctx) -> None:
        from quantatlas.quant.sensitivity import allocated_arm

        state.arm, state.records["allocation"] = allocated_arm(state.lm, state.arm, state.calibration.tokens(ctx),
                                                               ctx.seed)
