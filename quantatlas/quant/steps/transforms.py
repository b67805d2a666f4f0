"""Transforms: function-preserving re-parametrisations (rotations, channel scales), in order."""
from __future__ import annotations

from quantatlas.quant.steps.base import Step, option_techniques


class TransformsStep(Step):
    field = "transforms"
    order = 20
    in_first_release = True

    def reads_calibration(self) -> bool:
        return True   # every transform gets the calibration draw (AWQ, SmoothQuant and equalize read it)

    def needs_whole_model(self) -> str | None:
        return "transforms need the whole model"

    def techniques(self) -> set[str]:
        """transform:<name> for each, and its options away from their defaults (transform:hadamard.no_residual)."""
        return {f"transform:{t.name}" for t in self.value} | \
            {o for t in self.value for o in option_techniques(t, f"transform:{t.name}")}

    def conflicts(self) -> str | None:
        act = getattr(self.arm, "act", None)
        if any(t.name == "spinquant" for t in self.value) and act is not None and \
                (act.static or act.scheme == "llamacpp_cpu"):
            return ("transforms: spinquant trains with the arm's activation quantizer in the loop, which must be "
                    "dynamic: act.static and act.scheme llamacpp_cpu are not supported")
        own = None if self.arm.codec is None or self.arm.codec.name == "gguf" else self.arm.codec.name
        for i, t in enumerate(self.value):     # AWQ searches its scales for a codec: its own, else the arm's
            if t.name == "awq" and getattr(t, "codec", None) is None and own is None:
                arm_codec = "none" if self.arm.codec is None else "a llama.cpp mixture (codec: gguf)"
                return (f"transforms.{i}.awq.codec: AWQ searches its scales for one codec, and the arm's codec is "
                        f"{arm_codec}: set the awq transform's own codec (e.g. q4_k)")
        return None

    def check_model(self, lm) -> None:
        """A transform that cannot fold into this model (a layout the folds do not read, an online rotation
        where one is already) is refused before any arm runs, with the message `apply` would give."""
        from quantatlas.errors import UserError

        field = f"{self.where}.transforms"
        for cfg in self.value:
            try:
                cfg.build().check_model(lm.model)
            except ValueError as e:
                raise UserError(f"{field}: {str(e).removeprefix('transforms: ')}", field) from None

    def apply(self, state, ctx) -> None:
        apply_transforms(state.working_model(), state.arm, state.calibration.tokens(ctx), ctx)


def apply_transforms(model, arm, calib, ctx) -> None:
    """The arm's transforms on `model`, in place, in order (sensitivity measures with them too)."""
    codec = None if arm.codec is None or arm.codec.name == "gguf" else arm.codec.build()
    for cfg in arm.transforms:
        t = cfg.build()
        if getattr(t, "codec", "absent") is None:  # AWQ searches its scales for the arm's own codec
            t.codec = codec
        if hasattr(t, "bind"):   # SpinQuant trains its rotations with the arm's quantizers in the loop
            t.bind(codec, getattr(arm, "act", None), getattr(arm, "kv", None))
        t.apply(model, calib, ctx)
