"""An external artifact as the arm's weights: a weights step that loads instead of quantizing
(quant/external/: a GGUF file, a compressed-tensors folder, a GPTQ or AWQ checkpoint). It runs in the
weights' place (the arm has no codec, so the weight recipe does nothing), before the KV-cache and
activation steps, which apply to it as to any arm. Bits and bytes are the artifact's own."""
from __future__ import annotations

from pathlib import Path

from quantatlas.quant.external.config import ArtifactConfig
from quantatlas.quant.steps.base import Step

#: arm keys that make weights of their own: an artifact arm's weights are the artifact's
_WEIGHT_KEYS = ("codec", "overrides", "transforms", "allocate", "recovery")


class ArtifactStep(Step):
    field = "artifact"
    order = 31            # right after the (empty) weight recipe
    config = ArtifactConfig

    def quantizes(self) -> bool:
        return True

    def needs_whole_model(self) -> str | None:
        return "an artifact's weights are loaded into the whole model"

    def techniques(self) -> set[str]:
        return {f"artifact:{self.value.format}"}

    def conflicts(self) -> str | None:
        """Only the runtime steps (kv, act) act on an artifact's weights as on any arm's; everything that
        makes or changes weights (a codec, a solver or its options, transforms, allocation, recovery, a step
        on packed matrices) has nothing of its own to work on."""
        from quantatlas.quant.steps.base import RuntimeStep, steps_of

        arm = self.arm
        have = [k for k in _WEIGHT_KEYS if getattr(arm, k, None) not in (None, [], {})]
        if arm.solver != "rtn":
            have.append("solver")
        if arm.solver_options.options(True):
            have.append("solver_options")
        if arm.include_head:
            have.append("include_head")
        have += [s.field for s in steps_of(arm) if s.field not in (*_WEIGHT_KEYS, self.field, "codec")
                 and not isinstance(s, RuntimeStep) and s.field not in have]
        if have:
            return (f"an artifact arm's weights are the artifact's; it takes no {', '.join(have)} (kv and act may "
                    "be added: they act at run time)")
        return None

    @classmethod
    def identity(cls, dumped):
        """The artifact's content hash (its path and provenance are no part of it)."""
        if isinstance(dumped, dict) and dumped.get("sha256"):
            return {"sha256": dumped["sha256"]}
        return {k: v for k, v in dumped.items() if k != "provenance"} if isinstance(dumped, dict) else dumped

    def resolve(self, base, require: bool) -> ArtifactConfig:
        from quantatlas.quant.external.stored import resolve

        return resolve(self.value, None if base is None else Path(base), f"{self.where}.artifact", require)

    def check_model(self, lm) -> None:
        from quantatlas.quant.external.weights import open_artifact

        open_artifact(self.value, lm.model, self.where, self.arm)

    def apply(self, state, ctx) -> None:
        from quantatlas.quant.external.weights import open_artifact

        model = state.working_model()
        ext = open_artifact(self.value, model, self.where, state.arm)
        ext.load_into(model)
        state.external = ext.sizes(model)
