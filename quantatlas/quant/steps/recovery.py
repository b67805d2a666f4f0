"""Finetune recovery right after the weights, the fp model (after the transforms) as teacher
(quant/recovery.py: KD-STE, Block-AP, PV-lite, QAD; quant/roste.py: RoSTE)."""
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

    def conflicts(self) -> str | None:
        """qad needs a codec it can re-round on frozen scales; roste its act/kv/transforms in a form it trains
        (quant/roste.py: arm_conflicts)."""
        method = self.value.method
        if method == "qad":
            from quantatlas.quant.qad import QAD_CODECS

            codec = getattr(self.arm.codec, "name", None)
            if codec not in QAD_CODECS:
                return (f"recovery: qad re-rounds weights on the pack's frozen scales, which it does for codecs "
                        f"{', '.join(QAD_CODECS)}; the arm's codec is {codec} (use kd_ste with train: weights)")
        if method == "roste":
            from quantatlas.quant.roste import arm_conflicts

            return arm_conflicts(self.arm)
        return None

    def techniques(self) -> set[str]:
        return {f"recovery:{self.value.method}"} | option_techniques(self.value, "recovery")   # recovery.train=weights

    def apply(self, state, ctx) -> None:
        from quantatlas.quant.recovery import Recovery, recover

        model, cal = state.working_model(), state.calibration
        tick = None
        if state.progress is not None:
            tick = state.progress.task(f"{state.label}: recover", Recovery(self.value, ctx.seed).total_steps(model))
        if self.value.method == "roste":   # trains with the arm's act and kv quantizers in the loop
            from quantatlas.quant.roste import recover_roste

            state.packed, state.records["recovery"], state.records["rotations"] = recover_roste(
                model, state.fp_model, state.packed, self.value, ctx.seed, cal.stream(), cal.held_out_stream(),
                cal.held_out_tokens, getattr(self.arm, "act", None), getattr(self.arm, "kv", None), tick)
            return
        state.packed, state.records["recovery"] = recover(
            model, state.fp_model, state.packed, self.value, ctx.seed, cal.stream(), cal.held_out_stream(),
            cal.held_out_tokens, tick)
