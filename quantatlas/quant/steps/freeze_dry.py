"""Freeze-dry: a storage filter on the packed matrices (quant/freeze_dry.py), after the weights and
recovery, before the runtime steps. Every quantized matrix's pack becomes a FrozenPacked, and the
model's dropped weights take the values the loader rebuilds, so KLD, bits and artifact bytes are the
filtered model's."""
from __future__ import annotations

from quantatlas.quant.freeze_dry import FreezeDryConfig
from quantatlas.quant.steps.base import Step


class FreezeDryStep(Step):
    field = "freeze_dry"
    order = 45
    config = FreezeDryConfig

    def quantizes(self) -> bool:
        return True

    def needs_whole_model(self) -> str | None:
        return "freeze-dry filters the packed matrices held in memory (a layer-streamed run writes them to shards)"

    def techniques(self) -> set[str]:
        return {"freeze_dry"}          # tol is a setting

    def conflicts(self) -> str | None:
        """Codecs that store no plain per-weight codes (vector codes, ggml blocks, 2:4) and incoherence
        packs are refused with the arm; a codec that cannot be built here (no torch) is checked at run time."""
        arm = self.arm
        if getattr(arm.solver_options, "incoherence", False):
            return "freeze_dry filters plain codes; incoherence stores codes of a rotated matrix"
        for where, cfg in [("codec", arm.codec)] + [(f"overrides.{i}.codec", o.codec)
                                                    for i, o in enumerate(arm.overrides)]:
            if cfg is None:
                continue
            if cfg.name == "gguf":
                return "freeze_dry filters scalar codecs; a llama.cpp mixture (codec: gguf) stores ggml blocks"
            why = _not_scalar(cfg)
            if why:
                return f"{where}: {why}"
        return None

    def apply(self, state, ctx) -> None:
        from quantatlas._lazy import torch
        from quantatlas.quant.freeze_dry import freeze_dry

        model = state.working_model()
        dropped = total = 0
        for name in sorted(state.packed):
            param = model.get_parameter(name)
            if param.dim() != 2:
                continue    # a norm's gain an override quantizes: one vector, no row neighbours to predict from
            try:
                frozen = freeze_dry(state.packed[name], self.value.tol)
            except ValueError as e:
                raise ValueError(f"freeze_dry: {name}: {e}") from None
            state.packed[name] = frozen
            rebuilt = frozen.decode()
            mask = frozen.mask
            if tuple(param.shape) != tuple(frozen.shape):      # Conv1D keeps [in, out]
                rebuilt, mask = rebuilt.T, mask.T
            with torch.no_grad():
                m = mask.to(param.device)
                param[m] = rebuilt.to(param.device, param.dtype)[m]
            dropped += int(frozen.mask.sum())
            total += frozen.mask.numel()
        state.records["freeze_dry"] = {"freeze_dropped": dropped / total if total else 0.0}


#: the widest group the spec-time probe encodes (`Codec.probe`: one group)
PROBE_MAX_COLS = 2 ** 17


def _not_scalar(cfg) -> str | None:
    """Why the codec of `cfg` cannot be freeze-dried (its probe pack shows what it stores), or None."""
    try:
        from quantatlas.quant.freeze_dry import scalar_codec_of

        codec = cfg.build()
        cols = codec.group_size or 256
        if cols > PROBE_MAX_COLS:
            return None     # a group wider than any matrix: the weights step refuses it against the model
        scalar_codec_of(codec.probe(cols))
    except ImportError:
        return None
    except ValueError as e:
        return str(e)
    return None
