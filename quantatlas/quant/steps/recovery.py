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
        """Nothing quantized, nothing to recover; pv_lite and pv_tuning move the codes of some codecs only; qad
        needs a codec it can re-round on frozen scales; roste its act/kv/transforms in a form it trains
        (quant/roste.py: arm_conflicts)."""
        from quantatlas.quant.config import arm_codecs

        method = self.value.method
        codecs = list(arm_codecs(self.arm, None))
        if not codecs:
            return (f"recovery: {method} tunes quantized weights, and the arm quantizes none (no codec, override or "
                    "allocation)")
        if method in ("pv_lite", "pv_tuning"):
            from quantatlas.quant.pv_tuning import SUPPORTED

            allowed = ("uniform",) if method == "pv_lite" else SUPPORTED
            for cfg, field in codecs:
                if cfg.name not in allowed:
                    return (f"recovery: {method} moves the codes of {', '.join(allowed)}; {field} is {cfg.name} "
                            "(use kd_ste)")
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

    def check_model(self, lm) -> None:
        """`train: scales` needs packs with a per-row/group fp16 scale their decode is linear in: each codec the
        arm stores is tried on a probe of one group (quant/recovery.py: check_scales_trainable) before any arm
        runs, not after its weights are quantized."""
        from quantatlas.errors import UserError
        from quantatlas.quant.quantize import planned_matrices
        from quantatlas.quant.recovery import check_scales_trainable

        if self.value.train == "weights":
            return
        cols = {}
        for p in planned_matrices(self.arm, lm.model, self.where)[1]:
            cols.setdefault(id(p.codec), (p.codec, p.target.shape[1]))
        for codec, width in cols.values():
            try:
                check_scales_trainable(codec, width)
            except ValueError as e:
                raise UserError(f"{self.where}.{e}", f"{self.where}.recovery.train") from None

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
