"""Solvers: how a weight matrix is brought onto a codec's grid.

rtn   the codec alone (round to nearest, with the codec's own parameter search)
gptq  GPTQ / LDLQ error feedback through the Hessian of the layer inputs; GPTAQ with H_cross

Note: `quantatlas.quant.solvers.gptq` is the function; the module is in sys.modules under
that name if its helpers are needed.
"""
from quantatlas.quant.solvers.gptq import GPTQ_OPTIONS, MAX_DAMP_RAISES, gptq
from quantatlas.quant.solvers.rtn import rtn

__all__ = ["GPTQ_OPTIONS", "MAX_DAMP_RAISES", "gptq", "rtn"]
