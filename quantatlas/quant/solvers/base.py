"""What every solver is: it brings one weight matrix onto a codec's grid, given the statistics
it asks for. The runner collects only what the solvers of a recipe need, layer by layer.

Statistics (per tensor, from its calibration inputs x, N rows):
    hessian   H = (2/N) Σ x xᵀ                       GPTQ's proxy Hessian
    cross     (2/N) Σ (x̃ - x) xᵀ                      GPTAQ: x̃ the fp model's input, x the quantized model's
    sq_mean   E[x_j²] per input column                 llama.cpp's importance matrix (imatrix)
"""
from __future__ import annotations

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
        """(Ŵ float32 with decode(packed) == Ŵ, the codec's Packed) for W [rows, cols]."""

    def config(self) -> dict:
        return {} if self.cfg is None else self.cfg.options()
