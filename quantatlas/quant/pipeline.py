"""One public call: quantize a loaded model with an arm's recipe.

    qm = quantize(lm, arm, calibration, RunContext(seed, device))
    qm.forward          what evaluation runs (in memory: the quantized module; streamed: a StreamedModel)
    qm.packed           the packed tensors by parameter name (in memory)
    qm.sizes            bit counts from the packed files (layer-streamed), else None
    qm.external         an artifact arm's bits and files (quant/external/weights.py: ExternalSizes), else None
    qm.runtime_bits(c)  bits per stored KV/activation value at eval window length c
    qm.records          what steps report (`allocation`, `recovery`)

The arm's steps (quant/steps/: allocate → transforms → weights → recovery → kv → act, each a module
with its config) run in order on a working copy of the model; the loaded model is never changed, unless
the caller gives it up (`in_place=True`: a process that quantizes once and keeps no fp weights, as the
peer bench's worker; the steps then change `lm.model` itself, and no second copy of the weights is
held). The
backend decides how: held in memory, or layer-streamed (`lm.streamed`), where a step that needs
the whole model is refused in one line before any work.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from quantatlas.context import RunContext
from quantatlas.errors import UserError
from quantatlas.models.load import LoadedModel
from quantatlas.models.stream import StreamError
from quantatlas.quant.quantize import calibration_tokens
from quantatlas.quant.steps import steps_of


@dataclass
class Calibration:
    """An arm's calibration data: the token stream (read on first use), the draw (`samples` windows of
    `seq_len` tokens, placed by the run seed), and the eval tokens recovery must keep off."""
    load: Callable[[], np.ndarray]
    samples: int = 64
    seq_len: int = 512
    held_out: Callable[[], np.ndarray] | None = None   # the eval stream
    held_out_tokens: int = 0                            # how many of its tokens the eval uses
    _stream: np.ndarray | None = field(default=None, repr=False)
    _draws: dict = field(default_factory=dict, repr=False)

    def stream(self) -> np.ndarray:
        if self._stream is None:
            self._stream = self.load()
        return self._stream

    def tokens(self, ctx: RunContext) -> torch.Tensor:
        """The seed's draw (computed once per seed)."""
        if ctx.seed not in self._draws:
            self._draws[ctx.seed] = calibration_tokens(self.stream(), self.samples, self.seq_len, ctx)
        return self._draws[ctx.seed]

    def held_out_stream(self) -> np.ndarray | None:
        return None if self.held_out is None else self.held_out()


@dataclass
class PipelineState:
    """What the steps share while an arm runs."""
    lm: LoadedModel
    arm: object                      # spec.Arm; allocation replaces it by the arm it resolved
    calibration: Calibration
    label: str
    progress: object = None          # progress bars (`task(description, total)`), or None
    model: torch.nn.Module | None = None
    streamed: object = None          # the working StreamedModel (layer-streamed backend)
    fp_model: torch.nn.Module | None = None
    recipe: object = None            # the weight recipe, once the weights step has run
    packed: dict = field(default_factory=dict)
    sizes: dict | None = None
    external: object = None          # an artifact arm's sizes (ExternalSizes), once it has loaded
    runtime_bits: list = field(default_factory=list)
    records: dict = field(default_factory=dict)
    in_place: bool = False           # the steps change lm.model itself (the caller gave it up)

    def working_model(self) -> torch.nn.Module:
        """The copy the steps change (the loaded model stays as it is); streamed: its skeleton.
        In place: the loaded model itself. Nothing reads lm.model's weights once this is first called:
        allocation (the only step that reads `state.lm`) runs before it, the fp teacher of recovery
        is copied from it before the weights change, and evaluation's reference log-probs are cached
        apart (eval/windows.py)."""
        if self.model is None:
            if self.lm.streamed is None:
                self.model = self.lm.model if self.in_place else copy.deepcopy(self.lm.model)
            else:
                self.streamed = self.lm.streamed.copy()
                self.model = self.streamed.model
        return self.model


@dataclass
class QuantizedModel:
    model: torch.nn.Module
    streamed: object
    packed: dict
    sizes: dict | None
    runtime: list
    records: dict
    external: object = None

    @property
    def forward(self):
        return self.model if self.streamed is None else self.streamed

    def runtime_bits(self, eval_ctx: int | None) -> dict[str, float]:
        out: dict[str, float] = {}
        for bits in self.runtime:
            out.update(bits(eval_ctx))
        return out


def check_backend(lm: LoadedModel, arm, where: str = "arm") -> None:
    """Refuse, in one line, a step a layer-streamed model cannot run, or one that cannot run on this model
    (an artifact of another architecture)."""
    for step in steps_of(arm, where):
        reason = step.needs_whole_model() if lm.streamed is not None else None
        if reason:
            raise StreamError(f"{where}.{step.field}: {reason}; set QUANTATLAS_STREAM=0 to run it in memory",
                              f"{where}.{step.field}")
        step.check_model(lm)


def quantize(lm: LoadedModel, arm, calibration: Calibration, ctx: RunContext, progress=None,
             where: str = "arm", in_place: bool = False) -> QuantizedModel:
    """The arm's steps on a copy of `lm` (module docstring); `in_place`: on `lm.model` itself, which
    afterwards is the quantized model (a layer-streamed model is always worked on as a copy of its
    skeleton: it holds no weights to copy)."""
    check_backend(lm, arm, where)
    state = PipelineState(lm, arm, calibration, f"{where.removeprefix('arms.')} seed {ctx.seed}", progress,
                          in_place=in_place)
    wants_fp = any(s.wants_fp_model for s in steps_of(arm, where))
    for kind in [type(s) for s in steps_of(arm, where, active=False)]:
        step = kind(state.arm, where)   # a step reads the arm as the steps before it left it (allocation)
        if not step.active:
            continue
        if step.quantizes() and wants_fp and state.fp_model is None:
            # the teacher: the fp model in the quantized model's basis (after the transforms)
            state.fp_model = copy.deepcopy(state.working_model())
        try:
            step.apply(state, ctx)
        except UserError:
            raise
        except ValueError as e:   # a step's message names its own field ("kv.k: ...", "recovery.train: ...")
            head = str(e).split(":", 1)[0]
            if head.split(".")[0] != step.field:
                raise
            raise UserError(f"{where}.{e}", f"{where}.{head}") from None
    model = state.working_model()
    return QuantizedModel(model, state.streamed, state.packed, state.sizes, state.runtime_bits, state.records,
                          state.external)
