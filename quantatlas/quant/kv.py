"""KV-cache quantization in the forward pass: K and V are stored through a codec as a cache would
store them, and every query attends to the stored (decoded) values.

Hook point: transformers' attention function (AttentionInterface). It receives K and V after
RoPE, [batch, kv_heads, tokens, head_dim], which is what a KV cache holds (llama.cpp, KIVI). Each
token's head vector is one row for the codec, so a codec's groups are blocks along head_dim
(q8_0's 32, or `uniform {group: null}` for one scale per token and head). In a full-sequence
forward every token attends to quantized keys and values, its own included, as in a decode
that stores each token before reading the cache; so every scored token is affected.

Bits per stored value are the codec's stored bits for rows of head_dim (scales included).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from quantatlas.quant.config import config_field

#: the name our attention function is registered under
ATTENTION = "quantatlas_kv"
#: rows over which the per-value bits are counted (amortises per-tensor data such as a seed)
BITS_ROWS = 4096


class KVCacheConfig(BaseModel):
    """`kv: {k: <codec>, v: <codec>}`; null (the default) keeps that half of the cache in fp16."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    k: config_field("codec") = None
    v: config_field("codec") = None

    @property
    def seeded(self) -> bool:
        return any(c is not None and c.seeded for c in (self.k, self.v))


def bits_per_value(codec, head_dim: int) -> float:
    return 16.0 if codec is None else codec.bits_per_weight((BITS_ROWS, head_dim))


class KVCacheQuantizer:
    """K and V codecs (for one run seed), attached to every attention module of a model."""

    def __init__(self, cfg: KVCacheConfig, seed: int = 0):
        self.cfg = cfg
        self.k = None if cfg.k is None else cfg.k.build().for_run(seed)
        self.v = None if cfg.v is None else cfg.v.build().for_run(seed)

    def attach(self, model) -> None:
        from transformers import AttentionInterface

        from quantatlas.models.layout import layout

        if ATTENTION not in AttentionInterface._global_mapping:
            AttentionInterface.register(ATTENTION, _attention)
        inner = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if inner == ATTENTION:
            raise ValueError("kv: this model already quantizes its KV cache")
        lay = layout(model)
        if not lay.layers or any(layer.attention is None for layer in lay.layers):
            raise ValueError(f"kv: {type(model).__name__}: no attention modules found to quantize the cache of")
        for layer in lay.layers:
            layer.attention._quantatlas_kv = (self.k, self.v, inner)
        model.config._attn_implementation = ATTENTION

    def bits(self, head_dim: int) -> dict[str, float]:
        bk, bv = bits_per_value(self.k, head_dim), bits_per_value(self.v, head_dim)
        return {"kv_bits_k": bk, "kv_bits_v": bv, "kv_bits": (bk + bv) / 2}


def fake_quantize_heads(x, codec):
    """[..., head_dim] through the codec, one row per token and head; dtype kept."""
    if codec is None:
        return x
    d = x.shape[-1]
    return codec.fake_quantize(x.reshape(-1, d)).reshape(x.shape).to(x.dtype)


def _attention(module, query, key, value, attention_mask, **kwargs):
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    k_codec, v_codec, inner = module._quantatlas_kv
    key, value = fake_quantize_heads(key, k_codec), fake_quantize_heads(value, v_codec)
    if inner == "eager":
        fn = sys.modules[type(module).__module__].eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[inner]
    return fn(module, query, key, value, attention_mask, **kwargs)
