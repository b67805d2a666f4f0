"""Solvers: how a weight matrix is brought onto a codec's grid. Each module defines one or more
with their config classes:

rtn    the codec alone (round to nearest, with the codec's own parameter search)
gptq   GPTQ / LDLQ error feedback through the Hessian of the layer inputs
gptaq  GPTQ with fp targets and quantized inputs (the cross term)

`gptq(W, H, codec, ...)` and `rtn(W, codec)` are the functions with the math.
"""
from quantatlas.quant.solvers.base import STATISTICS, Solver
from quantatlas.quant.solvers.gptq import MAX_DAMP_RAISES, gptq
from quantatlas.quant.solvers.rtn import rtn

__all__ = ["MAX_DAMP_RAISES", "STATISTICS", "Solver", "gptq", "rtn"]
