"""AWQ (Lin et al. 2023): activation-aware per-channel scales, searched by error after quantization.

For each consumer group (qkv, gate_up, o, down) of every layer:

    s(alpha) = m^alpha / sqrt(max(m^alpha) · min(m^alpha)),   m_i = E|x_i|   (llm-awq's normalisation)
    alpha*   = argmin over alpha ∈ {0, 1/grid, ..., (grid-1)/grid} of
               Σ_c E‖(Q(W_c diag(s)) diag(1/s) - W_c) x‖² = (N/2)·Σ_c tr(Δ_c H Δ_cᵀ)

with Q the codec's fake quantization (encode → decode) and H = (2/N) Σ x xᵀ the group's input
Hessian proxy, so the error is the exact output error of the group's linears on the calibration
tokens. Then W_c ← W_c diag(s(alpha*)) and 1/s is folded into the producer (see _scales.py).
alpha = 0 gives s = 1, so the chosen scales never do worse than none on this objective.

Difference from llm-awq: it scores q/k/v by the whole attention block's output and gate/up by the
MLP's output (nonlinear, needs stored activations); we score every group by its own linear
outputs, which needs only H. llm-awq's separate weight-clipping search is not part of this transform.
"""
from __future__ import annotations

from pydantic import Field

from quantatlas._lazy import no_grad, torch
from quantatlas.quant.config import TransformConfig, config_field
from quantatlas.quant.transforms import _llama, _scales
from quantatlas.quant.transforms.base import ROLE_GROUPS, RoleGroup, Transform, check_calib


class AWQConfig(TransformConfig):
    name = "awq"
    grid: int = Field(20, ge=1)
    codec: config_field("codec") = None   # null: the arm's own codec
    roles: list[RoleGroup] = list(ROLE_GROUPS)

    def build(self):
        return AWQ(self)


class AWQ(Transform):
    name = "awq"
    batch_size = 8
    #: consecutive layers whose fp32 Hessians are held together at most
    max_hessian_bytes = 2 ** 31

    def __init__(self, cfg: AWQConfig):
        super().__init__(cfg)
        self.grid, self.roles = cfg.grid, tuple(cfg.roles)
        self.codec = None if cfg.codec is None else cfg.codec.build()
        self.chosen: dict[tuple[int, str], float] = {}  # (layer, group) → alpha*, for the record

    def alphas(self) -> list[float]:
        return [i / self.grid for i in range(self.grid)]

    def _output_error(self, weights: list[torch.Tensor], s: torch.Tensor, hessian: torch.Tensor) -> float:
        err = 0.0
        for w in weights:
            w_hat = self.codec.decode(self.codec.encode(w * s[None, :])).to(w) / s[None, :]
            delta = (w_hat - w).double()
            err += float(((delta @ hessian) * delta).sum())
        return err

    def search(self, layer: _llama.Layer, group: str, abs_mean: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """The best s (per free channel) for one group; records alpha*."""
        m = _scales.positive(_scales.reduce_stat(layer, group, abs_mean))
        weights = [lin.weight.detach().float() for lin in _scales.consumers(layer, group)]
        hessian = hessian.double().to(weights[0].device)
        best = (float("inf"), None, None)
        for alpha in self.alphas():
            s = m ** alpha
            s = s / torch.sqrt(s.max() * s.min())
            s_in = _scales.expand_scale(layer, group, s).float().to(weights[0].device)
            err = self._output_error(weights, s_in, hessian)
            if err < best[0]:
                best = (err, alpha, s)
        self.chosen[(layer.index, group)] = best[1]
        return best[2]

    def _chunks(self, layers: list[_llama.Layer]) -> list[list[_llama.Layer]]:
        """Consecutive layers whose fp32 Hessians fit in max_hessian_bytes together (≥ 1 layer each)."""
        def size(layer):
            return sum(4 * _scales.stat_module(layer, g).in_features ** 2 for g in self.roles)
        chunks, current, used = [], [], 0
        for layer in layers:
            if current and used + size(layer) > self.max_hessian_bytes:
                chunks.append(current)
                current, used = [], 0
            current.append(layer)
            used += size(layer)
        return chunks + ([current] if current else [])

    @no_grad
    def apply(self, model, calib_tokens, ctx=None):
        from quantatlas.models.calib import input_statistics

        if self.codec is None:
            raise ValueError("awq.codec is not set: give awq: {codec: {name: options}} (the codec the scales are "
                             "searched for), or let the recipe pass the arm's codec")
        calib_tokens = check_calib("awq", calib_tokens)
        layers = _llama.layers(model)
        for layer in layers:
            for group in self.roles:
                _scales.check_foldable(layer, group, "awq")
        # Scales keep the function, so statistics of later layers do not depend on earlier folds;
        # layers are grouped only to bound the memory held by full Hessians.
        for chunk in self._chunks(layers):
            modules = {f"{layer.index}/{g}": _scales.stat_module(layer, g) for layer in chunk for g in self.roles}
            stats = input_statistics(model, modules, calib_tokens, batch_size=self.batch_size, hessian=True)
            for layer in chunk:
                for group in self.roles:
                    st = stats.pop(f"{layer.index}/{group}")
                    _scales.fold(layer, group, self.search(layer, group, st.abs_mean, st.hessian))
