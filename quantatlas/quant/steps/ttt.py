"""Test-time training at evaluation (eval/ttt.py): the arm's `ttt:` block. It changes nothing in the
quantized model: the harness (quantatlas/measure.py) evaluates the arm a second time with score-first
TTT and reports `<metric>_ttt` beside the standard metrics. An arm with `ttt:` is its own arm (its
key and id include the block); arms without it keep theirs (a step added after the first release)."""
from __future__ import annotations

from quantatlas.eval.ttt import TTTConfig
from quantatlas.quant.steps.base import Step, option_techniques


class TestTimeTrainingStep(Step):
    field = "ttt"
    order = 90        # after every step that makes the model: it acts only at evaluation
    config = TTTConfig

    def seeded(self) -> bool:
        return self.value.seeded

    def needs_whole_model(self) -> str | None:
        return "test-time training trains the whole model's parameters in memory"

    def techniques(self) -> set[str]:
        return {f"ttt:{self.value.params}"} | option_techniques(self.value, "ttt", ("optimizer",))

    def conflicts(self) -> str | None:
        if self.value.params == "scales" and self.arm.codec is None and not self.arm.overrides:
            return "ttt.params: scales trains the quantized weights' scales, and this arm quantizes none " \
                   "(use norms or lora)"
        act = getattr(self.arm, "act", None)
        if act is not None and act.scheme == "llamacpp_cpu":
            return ("ttt trains through the quantized forward pass; act: llamacpp_cpu computes its dot products as "
                    "llama.cpp does, with no gradient (use another act scheme, or no ttt)")
        if self.value.params == "scales" and getattr(self.arm.solver_options, "incoherence", False):
            return "ttt.params: scales: incoherence packs keep their scales in a rotated basis (use norms or lora)"
        return None

    def check_model(self, lm) -> None:
        from quantatlas.errors import UserError
        from quantatlas.eval.ttt import norm_params

        if self.value.params == "norms" and not norm_params(lm.model):
            raise UserError(f"{self.where}.ttt.params: norms: the model has no norm gain to train",
                            f"{self.where}.ttt.params")
        if self.value.params == "scales":
            self._check_scales(lm)

    def _check_scales(self, lm) -> None:
        """Each codec the arm stores a Linear with must keep a per-row/group fp16 scale: tried on a seeded probe
        of one group (eval/ttt.py scale_count), before any arm runs rather than after the standard evaluation."""
        from quantatlas.errors import UserError
        from quantatlas.eval.ttt import scale_count
        from quantatlas.quant.quantize import planned_matrices

        seen = set()
        for p in planned_matrices(self.arm, lm.model, self.where)[1]:
            if p.target.kind != "linear" or id(p.codec) in seen:
                continue
            seen.add(id(p.codec))
            try:
                scale_count(p.name, p.codec.probe(p.target.shape[1]))
            except ValueError as e:
                raise UserError(f"{self.where}.{e}", f"{self.where}.ttt.params") from None

    def apply(self, state, ctx) -> None:
        """Nothing to do while quantizing: TTT runs in the harness, after the standard evaluation."""
