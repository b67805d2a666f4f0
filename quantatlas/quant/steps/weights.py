"""The weights: a solver with a codec per tensor (overrides), or a llama.cpp mixture
(quant/recipe.py plans it; quant/quantize.py runs it in memory, quant/streamed.py layer-streamed)."""
from __future__ import annotations

from quantatlas.quant.steps.base import Step, option_techniques


class WeightsStep(Step):
    field = "codec"   # with solver, solver_options, overrides, propagation, include_head
    order = 30
    in_first_release = True

    @property
    def active(self) -> bool:
        return True   # an arm without a codec may still quantize through its overrides

    def _configs(self) -> list:
        arm = self.arm
        from quantatlas.quant.config import parse_config

        out = [arm.codec, arm.solver_options]
        for o in arm.overrides:
            out.append(o.codec)
            if o.solver is not None:
                out.append(parse_config("solver", o.solver))
        return [c for c in out if c is not None]

    def recipe(self):
        from quantatlas.quant.recipe import build_recipe

        return build_recipe(self.arm, self.where)

    def reads_calibration(self) -> bool:
        return self.recipe().needs_calibration

    def seeded(self) -> bool:
        return any(c.seeded for c in self._configs()) or self.reads_calibration()

    def check_model(self, lm) -> None:
        """Refused before any arm runs: an override that hits no tensor this arm quantizes on the model, a
        matrix whose columns a codec's group (or block) does not divide, and one whose rows do not fill a
        tiled codec's tiles (trellis/tcq `tile_rows`). Each names the field that set the codec."""
        from quantatlas.errors import UserError
        from quantatlas.quant.codecs.trellis import RowTiles
        from quantatlas.quant.quantize import tensors_to_quantize

        if not self.quantizes():
            return
        recipe = self.recipe()
        roles = tensors_to_quantize(lm.model, recipe)
        if self.arm.overrides:
            recipe.check_overrides(roles, lm.model, lm.source)
        for plan in recipe.plan(roles, lm.model):
            if plan.codec is None or plan.is_vector:
                continue
            rows, cols = plan.target.shape[:2]
            try:
                plan.codec.group_of(cols)
                if isinstance(plan.codec, RowTiles):
                    plan.codec.check_rows(rows)
            except ValueError as e:   # the codec an override gave this matrix, or the arm's
                field = next((f"{self.where}.overrides.{i}.codec"
                              for i, (_, codec, _) in enumerate(recipe.overrides) if codec is plan.codec),
                             f"{self.where}.codec")
                msg = str(e)
                if msg.startswith("codec.tile_rows: "):
                    field, msg = f"{field}.tile_rows", msg.removeprefix("codec.tile_rows: ")
                raise UserError(f"{field}: {plan.name}: {msg}", field) from None

    def needs_whole_model(self) -> str | None:
        if self.arm.codec is not None and self.arm.codec.name == "gguf":
            return "llama.cpp mixtures (codec: gguf) need the whole model"
        return None

    def quantizes(self) -> bool:
        return self.arm.codec is not None or any(o.codec is not None for o in self.arm.overrides)

    def techniques(self) -> set[str]:
        """solver:<name> (rtn is the default and none), codec:<name> or gguf:<FTYPE>, override:<codec|fp16>;
        the solver's and the codec's options away from their defaults (solver.incoherence,
        solver.act_order, codec.clip=mse, ...) and the arm's propagation=layer|parallel, include_head."""
        arm, out = self.arm, set()
        if arm.solver != "rtn":
            out.add(f"solver:{arm.solver}")
            out |= option_techniques(arm, None, ("propagation",))   # rtn reads no statistics to propagate
        out |= option_techniques(arm.solver_options, "solver")
        if arm.codec is not None:
            out.add(_codec_label(arm.codec))
            out |= option_techniques(arm.codec, "codec")
        for o in arm.overrides:
            out.add("override:" + (_codec_label(o.codec).split(":", 1)[1] if o.codec is not None else "fp16"))
        return out | option_techniques(arm, None, ("include_head",))

    def apply(self, state, ctx) -> None:
        from quantatlas.quant.quantize import quantize_model, tensors_to_quantize

        recipe = state.recipe = self.recipe()
        calib = state.calibration.tokens(ctx) if recipe.needs_calibration else None
        model = state.working_model()
        tick = None
        if state.progress is not None:
            n = sum(p.codec is not None for p in recipe.plan(tensors_to_quantize(model, recipe), model))
            tick = state.progress.task(f"{state.label}: quantize", n)
        if state.streamed is None:
            state.packed = quantize_model(model, recipe, calib, ctx, tick, records=state.records)
            return
        from quantatlas.quant.streamed import quantize_to_cache

        done = quantize_to_cache(state.streamed, recipe, calib, ctx, tick, records=state.records)
        state.streamed, state.sizes = done.model, {k: done.summary[k] for k in
                                                  ("bits_per_weight", "bits_per_param", "bytes_packed")}


def _codec_label(codec) -> str:
    """`codec:<name>`, or `gguf:<FTYPE>` for a llama.cpp mixture."""
    return f"gguf:{codec.ftype.upper()}" if codec.name == "gguf" else f"codec:{codec.name}"
