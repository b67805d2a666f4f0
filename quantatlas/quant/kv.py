"""KV-cache quantization in the forward pass: K and V are stored through a codec as a cache would
store them, and every query attends to the stored (decoded) values.

Hook point: transformers' attention function (AttentionInterface). It receives K and V after
RoPE, [batch, kv_heads, tokens, head_dim], which is what a KV cache holds (llama.cpp, KIVI). In a
full-sequence forward every query attends to the stored keys and values, its own included, as in
a decode that stores each token before reading the cache; so every scored token is affected.

Options (`kv: {k: <codec>, v: <codec>, ...}`, all but k/v default to a plain cache):

placement (K only)
    `post_rope` (default): K as the cache stores it, after RoPE (llama.cpp, KIVI).
    `pre_rope`: K before RoPE (KVQuant): after k_norm for Qwen3/Gemma 3 (q/k_proj -> k_norm ->
    RoPE), the k_proj output for Llama. The hook inverts RoPE on the post-RoPE keys with the
    layer's own cos/sin (an exact rotation, up to fp32 rounding), quantizes, and applies RoPE
    again: the same as quantizing k_norm's output and rotating the stored value at read time.

k_granularity / v_granularity: which values share the codec's parameters (one codec row)
    `token` (default): one row per token and head, [head_dim]; the codec's groups are blocks
    along head_dim (q8_0's 32; `uniform {group: null}` is one scale per token and head).
    `channel`: one row per channel of a head across a group of `group_tokens` G consecutive
    tokens (KIVI's K); the codec's group must divide G (`group: null`: one scale per channel
    per G tokens).
    `head`: one row per head across a group of G tokens, [G·head_dim] (one scale per head and G
    tokens with `group: null`).
    A token group is stored quantized only once it is complete (a cache cannot quantize with
    statistics of tokens it has not seen), so until then its tokens stay fp16.

residual (R) and sinks (S): fp16 tokens
    The first S tokens (attention sinks) are never quantized. For the query at position i the
    keys/values at positions j with S <= j < L(i) are read quantized and the others in fp16, with
    L(i) = max(S, i + 1 - R) for `token` granularity (the R most recent tokens stay fp16: KIVI's
    value residual) and L(i) = S + G·floor(max(0, i + 1 - R - S) / G) for token groups (at least
    the R most recent tokens, plus the incomplete group, stay fp16; a token leaves the residual
    window when it is older than R and its group is complete). Each query therefore mixes
    quantized and fp16 keys: the attention is computed here by fused
    scaled_dot_product_attention over the keys [K_q ; K_fp] and values [V_q ; V_fp]
    concatenated along tokens (one copy per (K, V) read combination that occurs: two for a
    plain window, three when K and V windows differ, e.g. K per channel and V per token), with
    a boolean mask that shows query i each key j in exactly the copy it reads (cached per
    shape); query rows go in up to MIXED_BLOCKS blocks, each over only the columns it sees.
    This equals scores from both K versions selected per pair, softmax, and P·V split the same
    way (tests/test_kv.py keeps that formula as the oracle).

rotate: false (default) | true | auto, with rotation_seed
    A randomized Hadamard rotation Q (head_dim, ±1 signs from rotation_seed + the run seed) of
    the quantized halves: the codec stores Q·k (and Q·v) and the cache is read as Qᵀ·decode(...).
    For K that equals rotating both q and k (q·k is unchanged by Q, so only the quantization
    sees the rotation); for V it equals storing Q·v and applying Qᵀ to the attention output,
    i.e. folding Qᵀ into o_proj. llama.cpp now rotates quantized caches by default when
    head_dim % 64 == 0; `rotate: auto` is exactly that rule (each quantized half is rotated
    when head_dim % 64 == 0), but the default here stays `false` so an arm says what it does.
    A rotated arm is seeded (3 seeds draw 3 rotations).

Bits per stored K/V value are counted from what is stored: the codec's stored bits for its row
shape (head_dim for `token`, G for `channel`, G·head_dim for `head`; scales and zero points
included), and with fp16 residual/sink tokens the cache as it stands after the last token of an
eval window of ctx tokens: (n_q · b_codec + (ctx - n_q) · 16) / ctx with n_q = L(ctx - 1) - S
quantized tokens (so the residual, sinks and an incomplete token group count at 16 bits). The
rotation's signs are regenerated from the seed and not counted (8 bytes per model).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quantatlas.context import RunContext
from quantatlas.quant.config import config_field

#: the name our attention function is registered under
ATTENTION = "quantatlas_kv"
#: rows over which the per-value bits are counted (amortises per-tensor data such as a seed)
BITS_ROWS = 4096
#: llama.cpp rotates a quantized cache when head_dim is a multiple of this (`rotate: auto`)
AUTO_ROTATE_MULTIPLE = 64
#: mixed fp16/quantized attention: query rows are cut into at most this many blocks of at least
#: MIXED_MIN_ROWS rows; each block is one fused attention call over only the key copies it sees
MIXED_BLOCKS = 8
MIXED_MIN_ROWS = 64

Granularity = Literal["token", "channel", "head"]


class KVCacheConfig(BaseModel):
    """`kv: {k: <codec>, v: <codec>, placement, k_granularity, v_granularity, group_tokens,
    residual, sinks, rotate, rotation_seed}`; a null codec (the default) keeps that half fp16."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    k: config_field("codec") = None
    v: config_field("codec") = None
    placement: Literal["post_rope", "pre_rope"] = "post_rope"
    k_granularity: Granularity = "token"
    v_granularity: Granularity = "token"
    group_tokens: int = Field(32, ge=1, le=4096)
    residual: int = Field(0, ge=0)
    sinks: int = Field(0, ge=0)
    rotate: bool | Literal["auto"] = False
    rotation_seed: int = Field(0, ge=0, lt=2 ** 63)

    @property
    def seeded(self) -> bool:
        rotated = self.rotate is not False and any(c is not None for c in (self.k, self.v))
        return rotated or any(c is not None and c.seeded for c in (self.k, self.v))


class _Half:
    """How one half (K or V) of the cache is stored: codec, row layout, fp16 window, rotation."""

    def __init__(self, codec, granularity: str, cfg: KVCacheConfig, rotation):
        self.codec, self.granularity, self.rotation = codec, granularity, rotation
        self.G, self.R, self.S = cfg.group_tokens, cfg.residual, cfg.sinks

    @property
    def mixed(self) -> bool:
        """Whether some (query, key) pairs read this half in fp16 (needs our own attention)."""
        return self.codec is not None and (self.granularity != "token" or self.R > 0 or self.S > 0)

    def row_width(self, head_dim: int) -> int:
        return {"token": head_dim, "channel": self.G, "head": self.G * head_dim}[self.granularity]

    def quantized_end(self, i):
        """L(i): positions S <= j < L(i) are read quantized by the query at position i (tensor or int)."""
        if self.granularity == "token":
            return (i + 1 - self.R).clamp(min=self.S) if hasattr(i, "clamp") else max(self.S, i + 1 - self.R)
        if hasattr(i, "clamp"):
            return self.S + self.G * ((i + 1 - self.R - self.S).clamp(min=0) // self.G)
        return self.S + self.G * (max(0, i + 1 - self.R - self.S) // self.G)

    def fp_mask(self, tq: int, tk: int, device):
        """[tq, tk] True where the query reads the key/value in fp16 (keys after the query included)."""
        from quantatlas._lazy import torch

        i = torch.arange(tk - tq, tk, device=device)[:, None]
        j = torch.arange(tk, device=device)[None, :]
        return (j < self.S) | (j >= self.quantized_end(i))

    def bits(self, head_dim: int, ctx: int | None) -> float:
        if self.codec is None:
            return 16.0
        b = self.codec.bits_per_weight((BITS_ROWS, self.row_width(head_dim)))
        if not self.mixed:
            return b
        if ctx is None:
            raise ValueError("kv: bits of a cache with fp16 residual/sink tokens or token groups need the eval ctx")
        n_q = max(0, min(ctx, self.quantized_end(ctx - 1)) - self.S)
        return (n_q * b + (ctx - n_q) * 16.0) / ctx

    def check(self, head_dim: int, which: str) -> None:
        if self.codec is None:
            return
        width = self.row_width(head_dim)
        try:
            self.codec.group_of(width)
        except ValueError as e:
            raise ValueError(f"kv.{which}: {e} (rows of {width} values with {self.granularity} granularity)") from None

    def store(self, x):
        """What the cache returns for x [b, heads, t, head_dim]: every value through the codec (token
        groups: complete groups only, the rest unchanged), in x's dtype."""
        if self.codec is None:
            return x
        y = x if self.rotation is None else self.rotation.rotate(x.float())
        if self.granularity == "token":
            y = fake_quantize_heads(y, self.codec)
        else:
            y = _quantize_token_groups(y, self.codec, self.granularity, self.G, self.S)
        if self.rotation is not None:
            y = self.rotation.unrotate(y.float())
        return y.to(x.dtype)


def _quantize_token_groups(x, codec, granularity: str, G: int, S: int):
    b, h, t, d = x.shape
    n = (t - S) // G if t > S else 0
    if n == 0:
        return x
    body = x[:, :, S:S + n * G].reshape(b, h, n, G, d)
    if granularity == "channel":
        rows = body.transpose(-1, -2).reshape(-1, G)                  # one row per channel and group
        q = codec.fake_quantize(rows).reshape(b, h, n, d, G).transpose(-1, -2)
    else:
        q = codec.fake_quantize(body.reshape(-1, G * d)).reshape(b, h, n, G, d)
    out = x.clone()
    out[:, :, S:S + n * G] = q.reshape(b, h, n * G, d).to(x.dtype)
    return out


class KVCacheQuantizer:
    """K and V codecs (for one run seed), attached to every attention module of a model."""

    def __init__(self, cfg: KVCacheConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.k = None if cfg.k is None else cfg.k.build().for_run(RunContext(seed))
        self.v = None if cfg.v is None else cfg.v.build().for_run(RunContext(seed))
        self.halves: tuple[_Half, _Half] | None = None

    def rotates(self, head_dim: int) -> bool:
        r = self.cfg.rotate
        return r is True or (r == "auto" and head_dim % AUTO_ROTATE_MULTIPLE == 0)

    def _halves(self, head_dim: int) -> tuple[_Half, _Half]:
        rotation = None
        if self.rotates(head_dim) and (self.k is not None or self.v is not None):
            from quantatlas.quant.hadamard import RandomizedHadamard

            try:
                rotation = RandomizedHadamard(head_dim, RunContext(self.seed).sub_seed("offset", self.cfg.rotation_seed))
            except ValueError as e:
                raise ValueError(f"kv.rotate: {e}") from None
        return (_Half(self.k, self.cfg.k_granularity, self.cfg, rotation),
                _Half(self.v, self.cfg.v_granularity, self.cfg, rotation))

    def _layer_halves(self, model) -> tuple[list, bool]:
        """([(layer, K half, V half)] of every attention layer, whether K is stored before RoPE), each half
        checked against its layer's head_dim: what `attach` sets, or the ValueError (naming kv's field) it
        would raise."""
        from quantatlas.models.layout import layout

        lay = layout(model)
        if not lay.layers or any(layer.attention is None for layer in lay.layers):
            raise ValueError(f"kv: {type(model).__name__}: no attention modules found to quantize the cache of")
        pre_rope = self.cfg.placement == "pre_rope" and self.k is not None
        if pre_rope and lay.rope is None:
            raise ValueError(f"kv.placement: pre_rope: {type(model).__name__} has no RoPE (keys are stored as computed)")
        out = []
        for layer in lay.layers:
            head_dim = layer.head_dim or lay.head_dim
            k, v = self._halves(head_dim)
            k.check(head_dim, "k")
            v.check(head_dim, "v")
            out.append((layer, k, v))
        return out, pre_rope

    def check(self, model) -> None:
        """What `attach` would refuse on `model` (a codec group that does not divide a cache row, a head_dim
        the rotation cannot take, pre_rope without RoPE), refused without attaching anything."""
        self._layer_halves(model)

    def attach(self, model) -> None:
        from transformers import AttentionInterface

        if ATTENTION not in AttentionInterface._global_mapping:
            AttentionInterface.register(ATTENTION, _attention)
        inner = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if inner == ATTENTION:
            raise ValueError("kv: this model already quantizes its KV cache")
        layers, pre_rope = self._layer_halves(model)
        masks: dict = {}
        for layer, k, v in layers:
            self.halves = (k, v)
            layer.attention._quantatlas_kv = _LayerKV(k, v, inner, pre_rope, masks)
            if pre_rope:
                layer.attention.register_forward_pre_hook(_keep_position_embeddings, with_kwargs=True)
        model.config._attn_implementation = ATTENTION

    def bits(self, head_dim: int, ctx: int | None = None) -> dict[str, float]:
        k, v = self.halves if self.halves is not None else self._halves(head_dim)
        bk, bv = k.bits(head_dim, ctx), v.bits(head_dim, ctx)
        return {"kv_bits_k": bk, "kv_bits_v": bv, "kv_bits": (bk + bv) / 2}


class _LayerKV:
    def __init__(self, k: _Half, v: _Half, inner: str, pre_rope: bool, masks: dict | None = None):
        self.k, self.v, self.inner, self.pre_rope = k, v, inner, pre_rope
        self.masks = {} if masks is None else masks    # shared by the layers of one model

    def slots(self, tq: int, tk: int, device, causal: bool):
        """The (K stored?, V stored?) combinations that some (query, key) pair reads, and per block
        of query rows (r0, r1, cols, mask): the columns of the n concatenated copies [n·tk] that the
        block sees (None: all) and its [r1 - r0, len(cols)] boolean mask (built once per shape and
        cached). Pairs with j after the query read fp16 (as `fp_mask` says); `causal` hides them."""
        from quantatlas._lazy import torch

        key = (tq, tk, str(device), causal)
        hit = self.masks.get(key)
        if hit is not None:
            return hit
        full = torch.zeros(tq, tk, dtype=torch.bool, device=device)
        kq = full if self.k.codec is None else ~self.k.fp_mask(tq, tk, device)
        vq = full if self.v.codec is None else ~self.v.fp_mask(tq, tk, device)
        see = torch.ones_like(full)
        if causal:
            see = torch.arange(tk, device=device)[None, :] <= torch.arange(tk - tq, tk, device=device)[:, None]
        combos, masks = [], []
        for ck in (True, False):
            for cv in (True, False):
                m = see & (kq if ck else ~kq) & (vq if cv else ~vq)
                if bool(m.any()):
                    combos.append((ck, cv))
                    masks.append(m)
        mask = torch.cat(masks, dim=1)
        rows = max(MIXED_MIN_ROWS, -(-tq // MIXED_BLOCKS))
        blocks = []
        for r0 in range(0, tq, rows):
            m = mask[r0:r0 + rows]
            cols = m.any(0).nonzero().flatten()
            if len(cols) == mask.shape[1]:
                blocks.append((r0, r0 + m.shape[0], None, m))
            else:
                blocks.append((r0, r0 + m.shape[0], cols, m[:, cols]))
        if len(self.masks) >= 16:        # shapes change only at a window's tail; keep the cache small
            self.masks.clear()
        self.masks[key] = hit = (combos, blocks)
        return hit


def _keep_position_embeddings(module, args, kwargs):
    pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    module._quantatlas_rope = pe


def fake_quantize_heads(x, codec):
    """[..., head_dim] through the codec, one row per token and head; dtype kept."""
    if codec is None:
        return x
    d = x.shape[-1]
    return codec.fake_quantize(x.reshape(-1, d)).reshape(x.shape).to(x.dtype)


def _rotate_half(x):
    from quantatlas._lazy import torch

    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _unrope(module, key):
    """Keys before RoPE from keys after it: k = k'·cos − rotate_half(k')·sin (RoPE is a rotation by θ per pair)."""
    cos, sin = _rope_of(module, key)
    return key * cos - _rotate_half(key) * sin


def _rope(module, key):
    cos, sin = _rope_of(module, key)
    return key * cos + _rotate_half(key) * sin


def _rope_of(module, key):
    pe = getattr(module, "_quantatlas_rope", None)
    if pe is None:
        raise ValueError("kv.placement: pre_rope: the attention module was called without position_embeddings")
    cos, sin = pe
    if cos.shape[-1] != key.shape[-1] or cos.shape[-2] != key.shape[-2]:
        raise ValueError("kv.placement: pre_rope needs full-sequence forwards with RoPE over the whole head "
                         f"(cos {tuple(cos.shape)}, keys {tuple(key.shape)})")
    return cos.unsqueeze(1).to(key.dtype), sin.unsqueeze(1).to(key.dtype)


def _attention(module, query, key, value, attention_mask, **kwargs):
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kv: _LayerKV = module._quantatlas_kv
    if kv.pre_rope:
        key_q = _rope(module, kv.k.store(_unrope(module, key)))
    else:
        key_q = kv.k.store(key)
    value_q = kv.v.store(value)
    if kv.k.mixed or kv.v.mixed:
        return _mixed_attention(module, query, key, key_q, value, value_q, kv, attention_mask, **kwargs)
    if kv.inner == "eager":
        fn = sys.modules[type(module).__module__].eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[kv.inner]
    return fn(module, query, key_q, value_q, attention_mask, **kwargs)


def _mixed_attention(module, query, key, key_q, value, value_q, kv: _LayerKV, attention_mask,
                     scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """Causal attention where each (query, key) pair reads K and V quantized or in fp16 (residual
    window, sinks, incomplete token groups), as fused attention calls: the keys are the
    concatenation along tokens of one copy per (K stored?, V stored?) combination that occurs
    ([K_q ; K_fp] and [V_q ; V_fp] for a plain residual window), and a boolean mask lets query i
    see copy c of key j exactly where (i, j) reads K and V as copy c does (`_LayerKV.slots`). The
    softmax over the copies is the softmax over the keys, since each (i, j) is visible in one copy.
    Query rows go in a few blocks (MIXED_BLOCKS), each over only the columns it sees (the
    quantized prefix and the fp16 window), so the work stays near one plain causal attention."""
    from quantatlas._lazy import torch

    if sliding_window is not None:
        raise NotImplementedError("kv: residual windows, sinks and token groups with sliding-window attention")
    b, hq, tq, d = query.shape
    hk, tk = key.shape[1], key.shape[2]
    combos, blocks = kv.slots(tq, tk, query.device, causal=attention_mask is None)
    keys = torch.cat([key_q if kq else key for kq, _ in combos], dim=2)
    values = torch.cat([value_q if vq else value for _, vq in combos], dim=2)
    am = None
    if attention_mask is not None:
        am = attention_mask[..., :tk].expand(*attention_mask.shape[:-2], tq, tk)
        am = torch.cat([am] * len(combos), dim=-1)
    scale = d ** -0.5 if scaling is None else scaling
    outs = []
    for r0, r1, cols, mask in blocks:
        k, v = (keys, values) if cols is None else (keys.index_select(2, cols), values.index_select(2, cols))
        if hq != hk:      # GQA: the fused kernels take repeated KV heads (enable_gqa is not on every backend)
            k, v = k.repeat_interleave(hq // hk, dim=1), v.repeat_interleave(hq // hk, dim=1)
        if am is not None:
            a = am[..., r0:r1, :] if cols is None else am[..., r0:r1, :].index_select(-1, cols)
            mask = a & mask if a.dtype == torch.bool else a.to(query.dtype).masked_fill(~mask, float("-inf"))
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, r0:r1], k, v, attn_mask=mask, scale=scale))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None
