"""`moe:` on an arm: how the weights step calibrates a mixture-of-experts model's experts (quant/moe.py:
the starved-expert policy, its threshold and the routing weighting). The weights step reads it from the
arm; this step only checks, before any arm runs, that the model has experts to calibrate."""
from __future__ import annotations

from quantatlas.quant.moe import MoEConfig
from quantatlas.quant.steps.base import Step, option_techniques


class MoEStep(Step):
    field = "moe"
    order = 25          # before the weights (30), which read it
    config = MoEConfig | None

    def techniques(self) -> set[str]:
        """moe.starved=<policy>, moe.weighting=routing, moe.min_tokens: only options away from their defaults."""
        return option_techniques(self.value, "moe")

    def check_model(self, lm) -> None:
        from quantatlas.errors import UserError
        from quantatlas.models.layout import layout

        if not layout(lm.model).moe_blocks:
            raise UserError(f"{self.where}.moe: {lm.source} has no mixture-of-experts blocks to calibrate",
                            f"{self.where}.moe")

    def apply(self, state, ctx) -> None:
        pass     # the weights step reads the arm's `moe:`; check_model refused a model without experts
