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

    def check_model(self, lm) -> None:
        """What `attach` would refuse on this model (a codec group that does not divide an input width, roles or
        layers it lacks, a width a Hadamard cannot take) is refused before any arm runs, naming the field.
        llamacpp_cpu's codecs are each Linear's llama.cpp weight type: a weight the arm stores otherwise is refused."""
        from quantatlas.errors import UserError
        from quantatlas.quant.act import ActivationQuantizer, weight_types

        if self.value.scheme == "llamacpp_cpu":
            from quantatlas.quant.codecs.ggml.block_codec import formats
            from quantatlas.quant.quantize import planned_matrices

            field = f"{self.where}.act.scheme"
            recipe = planned_matrices(self.arm, lm.model, self.where)[0]
            try:
                weight_types(lm.model, recipe)
                for j, c in enumerate(self.arm.allocate.candidates if self.arm.allocate is not None else []):
                    if c.name not in formats():
                        raise ValueError(f"act.scheme: llamacpp_cpu needs llama.cpp weight types; "
                                         f"allocate.candidates.{j} is {c.name!r}")
            except ValueError as e:
                raise UserError(f"{self.where}.{e}", field) from None
        if self.value.codec_config() is None:
            return
        act = ActivationQuantizer(self.value)
        try:
            act.attach(lm.model)     # hooks only, no weight is touched; detached below
        except ValueError as e:
            raise UserError(f"{self.where}.act: {e}", f"{self.where}.act") from None
        finally:
            act.detach()

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
