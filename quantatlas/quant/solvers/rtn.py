"""Round to nearest: the codec on its own, no data beyond an optional per-column importance."""
from __future__ import annotations

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed
from quantatlas.quant.config import SolverConfig
from quantatlas.quant.solvers.base import Solver


class RTNConfig(SolverConfig):
    name = "rtn"
    #: random-sign Hadamard on both sides of W before the codec (quant/incoherence.py), for ablations
    incoherence: bool = False

    @property
    def seeded(self) -> bool:  # the signs follow the run seed
        return self.incoherence

    def build(self):
        return RTN(self)


class RTN(Solver):
    """The codec alone; an imatrix (sq_mean), when the recipe collects one, goes to the codec's fit."""

    name = "rtn"

    def solve(self, W, stats, codec):
        if self.cfg is None or not self.cfg.incoherence:
            return rtn(W, codec, importance=(stats or {}).get("sq_mean"))
        from quantatlas.quant.incoherence import Incoherence

        inc = Incoherence(*W.shape, self.next_tensor_seed())   # an imatrix does not survive the rotation
        w_rot, packed = rtn(inc.weight(W.double()).float(), codec)
        return inc.unweight(w_rot.double()).float(), inc.wrap(packed)


def rtn(W: torch.Tensor, codec: Codec, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Packed]:
    """(Ŵ = decode(encode(W)) as float32, the Packed); `importance` [cols] goes to the codec's fit."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"rtn: W must be a 2-D float tensor [rows, cols], got "
                         f"{tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__}")
    if importance is not None:
        importance = importance.detach().float().to(W.device)
        if importance.shape != (W.shape[1],):
            raise ValueError(f"rtn: importance must have one entry per column ({W.shape[1]}), "
                             f"got shape {tuple(importance.shape)}")
    packed = codec.encode(W.detach().float(), importance)
    return codec.decode(packed), packed
