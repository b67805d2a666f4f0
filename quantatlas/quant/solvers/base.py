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

    def config(self) -> dict:
        return {} if self.cfg is None else self.cfg.options()

    @property
    def seeded(self) -> bool:
        return bool(self.cfg is not None and self.cfg.seeded)

    #: the experiment seed of the run (set by `for_run`); solvers with random parts derive them from it
    run_seed: int = 0
    _tensors: int = 0

    def for_run(self, seed: int) -> "Solver":
        """The solver a run with this experiment seed uses (as `Codec.for_run`): a copy that knows
        the seed and counts the matrices it solves, so each gets its own random signs."""
        run = copy.copy(self)
        run.run_seed, run._tensors = int(seed), 0
        return run

    def next_tensor_seed(self) -> int:
        """A seed for the next matrix of this run (deterministic: matrices are solved in a fixed order)."""
        from quantatlas.quant.incoherence import tensor_seed

        self._tensors += 1
        return tensor_seed(self.run_seed, self._tensors - 1)
