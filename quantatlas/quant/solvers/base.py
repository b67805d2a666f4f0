"""What every solver is: it brings one weight matrix onto a codec's grid, given the statistics
it asks for. The runner collects only what the solvers of a recipe need, layer by layer.

Statistics (per tensor, from its calibration inputs x, N rows):
    hessian   H = (2/N) Σ x xᵀ                       GPTQ's proxy Hessian
    cross     (2/N) Σ (x̃ - x) xᵀ                      GPTAQ: x̃ the fp model's input, x the quantized model's
    sq_mean   E[x_j²] per input column                 llama.cpp's importance matrix (imatrix)
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import ClassVar

from quantatlas.context import RunContext

STATISTICS = ("hessian", "cross", "sq_mean")


class Solver(ABC):
    name: ClassVar[str]
    #: statistics `solve` needs (a subset of STATISTICS)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg=None):
        self.cfg = cfg

    @abstractmethod
    def solve(self, W, stats: dict, codec):
        """(Ŵ float32 with decode(packed) == Ŵ, the codec's Packed) for W [rows, cols].

        `stats` is handed over: a solver may overwrite its tensors (GPTQ factors the Hessian in its
        memory, which saves a cols² matrix on the largest layers); pass copies to use them again."""

    def can_batch(self, codec, W) -> bool:
        """Whether `solve_batch` solves matrices like W together (rather than one `solve` after another) and
        draws nothing from the run's per-matrix seeds doing so, so the order they are solved in is free."""
        return False

    def solve_batch(self, Ws: list, stats_list: list[dict], codec) -> list:
        """`solve` on each of several matrices of one shape (a mixture-of-experts layer's experts of one
        role), in order; a solver that can do them at once overrides it (GPTQ: `can_batch`)."""
        return [self.solve(W, s, codec) for W, s in zip(Ws, stats_list)]

    def config(self) -> dict:
        return {} if self.cfg is None else self.cfg.options()

    @property
    def seeded(self) -> bool:
        return bool(self.cfg is not None and self.cfg.seeded)

    #: the run context (set by `for_run`); solvers with random parts draw them from it
    ctx: RunContext = RunContext()
    _tensors: int = 0

    def for_run(self, ctx: RunContext) -> "Solver":
        """The solver a run uses (as `Codec.for_run`): a copy that holds the run context and counts
        the matrices it solves, so each gets its own random signs."""
        run = copy.copy(self)
        run.ctx, run._tensors = ctx, 0
        return run

    def next_tensor_seed(self) -> int:
        """A seed for the next matrix of this run (the context's "tensor" derivation; deterministic:
        matrices are solved in a fixed order)."""
        self._tensors += 1
        return self.ctx.sub_seed("tensor", self._tensors - 1)
