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

Mixture of experts (_scales.py): gate_up's one s on post_attention_layernorm's output takes m over every
token (the router's input), and its error is Σ over the quantized readers of tr(Δ_r H_r Δ_rᵀ) with
each expert's own Hessian of its routed rows (unweighted, as GPTQ's per-expert Hessians) and the
shared expert's over every token: the exact output error of each quantized reader on the tokens it
reads. The routers are scaled but stay fp16, so they add no error; an expert no token reached adds 0.
Each expert's down gets its own s_e from m and H of its routed hidden rows; an expert no calibration
token was routed to keeps s_e = 1.
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
        return self._pairs_error([(w, hessian) for w in weights], s)

    def _pairs_error(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], s: torch.Tensor) -> float:
        """Σ tr(Δ H Δᵀ) over (W, H) pairs, Δ = Q(W diag(s)) diag(1/s) - W: each weight with its own input's H."""
        err = 0.0
        for w, hessian in pairs:
            w = w.detach().float()        # a no-op on fp32 copies; an expert's view of a 3-D tensor, per use
            w_hat = self.codec.decode(self.codec.encode(w * s[None, :])).to(w) / s[None, :]
            delta = (w_hat - w).double()
            err += float(((delta @ hessian.double().to(delta.device)) * delta).sum())
        return err

    def _best(self, key: tuple[int, str], m: torch.Tensor, pairs: list, expand) -> torch.Tensor:
        """s(alpha*) over the grid for per-free-channel m; `expand` maps free scales to input channels."""
        device = pairs[0][0].device if pairs else m.device
        best = (float("inf"), None, None)
        for alpha in self.alphas():
            s = m ** alpha
            s = s / torch.sqrt(s.max() * s.min())
            err = self._pairs_error(pairs, expand(s).float().to(device))
            if err < best[0]:
                best = (err, alpha, s)
        self.chosen[key] = best[1]
        return best[2]

    def search(self, layer: _llama.Layer, group: str, abs_mean: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """The best s (per free channel) for one group of a dense layer; records alpha*."""
        m = _scales.positive(_scales.reduce_stat(layer, group, abs_mean))
        weights = [lin.weight.detach().float() for lin in _scales.consumers(layer, group)]
        hessian = hessian.double().to(weights[0].device)
        return self._best((layer.index, group), m, [(w, hessian) for w in weights],
                          lambda s: _scales.expand_scale(layer, group, s))

    def search_site(self, site: _scales.Site, stats: dict) -> torch.Tensor:
        """The best s of any site (an MoE layer's gate_up or one expert's down): each quantized weight's error
        with the Hessian of its own input (an expert's: its routed rows); a weight no token reached adds 0.
        Records alpha* under (layer, "gate_up") / (layer, "down/<expert>" or "down/shared")."""
        st = stats[site.key]
        if site.dense:
            return self.search(site.layer, site.group, st.abs_mean, st.hessian)
        m = _scales.positive(site.reduce(st.abs_mean))
        pairs = [(w, stats[k].hessian) for w, k in site.quantized if stats[k].count > 0]
        return self._best((site.layer.index, site.key.split("/", 1)[1]), m, pairs, site.expand)

    def _chunks(self, sites: dict[int, list[_scales.Site]]) -> list[list[int]]:
        """Consecutive layers whose fp32 Hessians fit in max_hessian_bytes together (≥ 1 layer each).

        An MoE layer holds one Hessian per expert for gate_up ((E + 1)·hidden², the router's input for a shared
        expert) and for down (E·moe_inter², + shared_inter²): Qwen3-30B-A3B (E = 128, hidden 2048, moe_inter
        768) needs 2.5 GB a layer in fp32, over the budget alone, so its chunks are one layer each (each chunk is
        one pass of the model over the calibration tokens)."""
        def size(index):
            return sum(4 * _scales.width(src) ** 2 for site in sites[index] for src in site.sources.values())
        chunks, current, used = [], [], 0
        for index in sites:
            if current and used + size(index) > self.max_hessian_bytes:
                chunks.append(current)
                current, used = [], 0
            current.append(index)
            used += size(index)
        return chunks + ([current] if current else [])

    @no_grad
    def apply(self, model, calib_tokens, ctx=None):
        if self.codec is None:
            raise ValueError("awq.codec is not set: give awq: {codec: {name: options}} (the codec the scales are "
                             "searched for), or let the recipe pass the arm's codec")
        calib_tokens = check_calib("awq", calib_tokens)
        sites = {layer.index: [site for g in self.roles for site in _scales.sites(layer, g)]
                 for layer in _llama.layers(model)}
        for site in (site for per in sites.values() for site in per):
            _scales.check_foldable(site, "awq")
        # Scales keep the function, so statistics of later layers do not depend on earlier folds;
        # layers are grouped only to bound the memory held by full Hessians.
        for chunk in self._chunks(sites):
            sources = {k: src for index in chunk for site in sites[index] for k, src in site.sources.items()}
            stats = _scales.statistics(model, sources, calib_tokens, batch_size=self.batch_size, hessian=True)
            for index in chunk:
                for site in sites[index]:
                    if stats[site.key].count > 0:    # an expert no calibration token was routed to keeps s = 1
                        site.fold(self.search_site(site, stats))
                for site in sites[index]:            # this layer's Hessians are done with
                    for k in site.sources:
                        stats.pop(k, None)
