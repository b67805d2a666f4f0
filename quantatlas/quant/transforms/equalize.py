"""Channel equalization: per input channel s_i = H_ii^alpha, W ← W diag(s), inverse folded upstream.

H = (2/N) Σ x xᵀ is the input Hessian proxy of the consumer group (GPTQ's), so H_ii = 2·E[x_i²].
The quantized weights see W diag(s) and the solver sees H ← diag(1/s) H diag(1/s) (its inputs are
x / s), and (W diag(s))(x / s) = W x keeps the function. alpha = 0 is the identity; alpha > 0
lifts the weight columns of high-energy input channels, whose quantization error the inputs
amplify most. See _scales.py for where 1/s goes in each group (qkv, gate_up, o, down).

Mixture of experts: gate_up's one s on post_attention_layernorm's output takes H over every token
(the router's input: the dense definition); each expert's down takes its own s_e = H_e,ii^alpha with
H_e over its routed rows' hidden act(gate_e x) ⊙ up_e x (a shared expert: every token). An expert no
calibration token was routed to keeps s_e = 1.
"""
from __future__ import annotations

from pydantic import Field

from quantatlas._lazy import no_grad
from quantatlas.quant.config import TransformConfig
from quantatlas.quant.transforms import _llama, _scales
from quantatlas.quant.transforms.base import ROLE_GROUPS, RoleGroup, Transform, check_calib


class EqualizeConfig(TransformConfig):
    name = "equalize"
    alpha: float = Field(0.15, ge=0, le=1, allow_inf_nan=False)
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
        calib_tokens = check_calib("equalize", calib_tokens)
        layers = _llama.layers(model)
        sites = [site for layer in layers for g in self.roles for site in _scales.sites(layer, g)]
        for site in sites:
            _scales.check_foldable(site, "equalize")
        if self.alpha == 0:
            return
        # diagonals only: one pass over the calibration tokens for every layer at once
        stats = _scales.statistics(model, {site.key: site.sources[site.key] for site in sites}, calib_tokens,
                                   batch_size=self.batch_size, hessian=False)
        for site in sites:
            st = stats[site.key]
            if st.count == 0:      # an expert no calibration token was routed to keeps s = 1
                continue
            h_diag = 2.0 * st.sq_mean
            site.fold(_scales.positive(site.reduce(h_diag)) ** self.alpha)
