"""Finetune recovery right after the weights, the fp model (after the transforms) as teacher
(quant/recovery.py: KD-STE, Block-AP, PV-lite)."""
from __future__ import annotations

from quantatlas.quant.steps.base import Step, option_techniques


class RecoveryStep(Step):
    field = "recovery"
    order = 40
    wants_fp_model = True

    def reads_calibration(self) -> bool:
        return True

    def needs_whole_model(self) -> str | None:
        return "finetuning needs the whole model"

    def techniques(self) -> set[str]:
        return {f"recovery:{self.value.method}"} | option_techniques(self.value, "recovery")   # recovery.train=weights

    def apply(self, state, ctx) -> None:
        from quantatlas.quant.recovery import Recovery, recover

        model, cal = state.working_model(), state.calibration
        tick = None
        if state.progress is not None:
            tick = state.progress.task(f"{state.label}: recover", Recovery(self.value, ctx.seed).total_steps(model))
        state.packed, state.records["recovery"] = recover(
            model, state.fp_model, state.packed, self.value, ctx.seed, cal.stream(), cal.held_out_stream(),
            cal.held_out_tokens, tick)
