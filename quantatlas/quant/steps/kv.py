"""The KV cache: K and V stored through codecs in every later forward pass (quant/kv.py)."""
from __future__ import annotations

from quantatlas.quant.steps.base import RuntimeStep


class KVCacheStep(RuntimeStep):
    field = "kv"
    order = 50
    in_first_release = True

    def apply(self, state, ctx) -> None:
        from quantatlas.models.layout import layout
        from quantatlas.quant.kv import KVCacheQuantizer

        model = state.working_model()
        kv = KVCacheQuantizer(self.value, ctx.seed)
        kv.attach(model)
        head_dim = next(layer.head_dim for layer in layout(model).layers)
        # bits per stored value count the fp16 residual/sink tokens at the eval window's length
        state.runtime_bits.append(lambda eval_ctx: kv.bits(head_dim, eval_ctx))
