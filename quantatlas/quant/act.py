"""Activation quantization: the input of every Linear (the head only if asked) goes through a
codec at run time, one row per token, so `uniform {bits: 8, group: null}` is per-token dynamic
int8 and `uniform {bits: 4, group: 128}` per-token groups of 128 (fake quantization: the Linear
then multiplies the decoded values).

Bits per stored value are the codec's stored bits for one token's row (scales included),
averaged over the quantized Linears weighted by their input width.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from quantatlas.quant.config import config_field

#: rows over which the per-value bits are counted
BITS_ROWS = 4096


class ActConfig(BaseModel):
    """`act: {codec: <codec>, include_head: false}`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    codec: config_field("codec", nullable=False)
    include_head: bool = False

    @property
    def seeded(self) -> bool:
        return self.codec.seeded


class ActivationQuantizer:
    def __init__(self, cfg: ActConfig, seed: int = 0):
        self.cfg = cfg
        self.codec = cfg.codec.build().for_run(seed)
        self.widths: list[int] = []

    def attach(self, model) -> None:
        from quantatlas.models.roles import find_roles

        linears = [t for t in find_roles(model) if t.kind in ("linear", "conv1d")
                   and (self.cfg.include_head or t.role != "head")]
        for t in linears:
            width = t.shape[1]
            self.codec.group_of(width)  # refuse a group that does not divide the input now, not mid-eval
            self.widths.append(width)
            t.module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0]
        return (self.codec.fake_quantize(x.reshape(-1, x.shape[-1])).reshape(x.shape).to(x.dtype),) + tuple(args[1:])

    def bits(self) -> dict[str, float]:
        total = sum(self.widths)
        bits = sum(w * self.codec.bits_per_weight((BITS_ROWS, w)) for w in self.widths) / max(total, 1)
        return {"act_bits": bits}
