"""The KV cache: K and V stored through codecs in every later forward pass (quant/kv.py)."""
from __future__ import annotations

from quantatlas.quant.steps.base import RuntimeStep


class KVCacheStep(RuntimeStep):
    field = "kv"
    order = 50
    in_first_release = True

    def check_model(self, lm) -> None:
        """What `attach` would refuse on this model (a codec group that does not divide a cache row, a head_dim
        the rotation cannot take, pre_rope without RoPE) is refused before any arm runs, naming the field."""
        from quantatlas.errors import UserError
        from quantatlas.quant.kv import KVCacheQuantizer

        try:
            KVCacheQuantizer(self.value).check(lm.model)
        except ValueError as e:   # its message starts with the field: "kv.k: ...", "kv.rotate: ..."
            raise UserError(f"{self.where}.{e}", f"{self.where}.{str(e).split(':', 1)[0]}") from None

    def apply(self, state, ctx) -> None:
        from quantatlas.models.layout import layout
        from quantatlas.quant.kv import KVCacheQuantizer

        model = state.working_model()
        kv = KVCacheQuantizer(self.value, ctx.seed)
        kv.attach(model)
        head_dim = next(layer.head_dim for layer in layout(model).layers)
        # bits per stored value count the fp16 residual/sink tokens at the eval window's length
        state.runtime_bits.append(lambda eval_ctx: kv.bits(head_dim, eval_ctx))
