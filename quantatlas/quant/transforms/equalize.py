"""Channel equalization: per input channel s_i = H_ii^alpha, W ← W diag(s), inverse folded upstream.

H = (2/N) Σ x xᵀ is the input Hessian proxy of the consumer group (GPTQ's), so H_ii = 2·E[x_i²].
The quantized weights see W diag(s) and the solver sees H ← diag(1/s) H diag(1/s) (its inputs are
x / s), and (W diag(s))(x / s) = W x keeps the function. alpha = 0 is the identity; alpha > 0
lifts the weight columns of high-energy input channels, whose quantization error the inputs
amplify most. See _scales.py for where 1/s goes in each group (qkv, gate_up, o, down).
"""
from __future__ import annotations

from pydantic import Field

from quantatlas._lazy import no_grad
from quantatlas.quant.config import TransformConfig
from quantatlas.quant.transforms import _llama, _scales
from quantatlas.quant.transforms.base import ROLE_GROUPS, RoleGroup, Transform, check_calib


class EqualizeConfig(TransformConfig):
    name = "equalize"
    alpha: float = Field(0.15, ge=0, allow_inf_nan=False)
    roles: list[RoleGroup] = list(ROLE_GROUPS)

    def build(self):
        return Equalize(self)


class Equalize(Transform):
    name = "equalize"
    batch_size = 8

    def __init__(self, cfg: EqualizeConfig):
        super().__init__(cfg)
        self.alpha, self.roles = cfg.alpha, tuple(cfg.roles)

    @no_grad
    def apply(self, model, calib_tokens, ctx=None):
        from quantatlas.models.calib import input_statistics

        calib_tokens = check_calib("equalize", calib_tokens)
        layers = _llama.layers(model)
        for layer in layers:
            for group in self.roles:
                _scales.check_foldable(layer, group, "equalize")
        if self.alpha == 0:
            return
        # diagonals only: one pass over the calibration tokens for every layer at once
        modules = {(layer.index, g): _scales.stat_module(layer, g) for layer in layers for g in self.roles}
        keyed = {f"{i}/{g}": m for (i, g), m in modules.items()}
        stats = input_statistics(model, keyed, calib_tokens, batch_size=self.batch_size, hessian=False)
        for layer in layers:
            for group in self.roles:
                h_diag = 2.0 * stats[f"{layer.index}/{group}"].sq_mean
                s = _scales.positive(_scales.reduce_stat(layer, group, h_diag)) ** self.alpha
                _scales.fold(layer, group, s)
