"""KV-cache quantization (quant/kv.py) against computations written here: a hand-written Qwen3
attention with its cache tensors quantized, hand-computed residual-window attention, the `gguf`
package's bytes for llama.cpp's cache types, and bits counted from what is stored."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from quantatlas.quant.kv import KVCacheConfig, KVCacheQuantizer

TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def _with_kv(model, seed=0, **cfg):
    m = copy.deepcopy(model)
    q = KVCacheQuantizer(KVCacheConfig(**cfg), seed)
    q.attach(m)
    return m, q


# ---- identity and zero codecs ------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, {"residual": 8, "sinks": 2}, {"k_granularity": "channel", "group_tokens": 8},
                                  {"k_granularity": "head", "v_granularity": "channel", "group_tokens": 4,
                                   "residual": 5}, {"placement": "pre_rope"}, {"rotate": True}])
def test_identity_codec_leaves_logits_unchanged(tiny_reference, opts):
    model = tiny_reference.model
    same, _ = _with_kv(model, k="toy_identity", v="toy_identity", **opts)
    want = _logits(model)
    got = _logits(same)
    if not opts:
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def _layer0_qkv(model, tokens):
    """Layer 0's attention inputs as a hand-written Qwen3 attention computes them: q, k after
    q_norm/k_norm, before and after RoPE, and v, [1, heads, t, head_dim]; and the layer's hidden input."""
    attn = model.model.layers[0].self_attn
    got = {}
    h = attn.register_forward_pre_hook(lambda m, a, kw: [got.setdefault("x", kw["hidden_states"]), None][1],
                                       with_kwargs=True)
    try:
        _logits(model, tokens)
    finally:
        h.remove()
    x = got["x"]
    t, d = x.shape[1], attn.head_dim
    q = attn.q_norm(attn.q_proj(x).view(1, t, -1, d)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(1, t, -1, d)).transpose(1, 2)
    v = attn.v_proj(x).view(1, t, -1, d).transpose(1, 2)
    theta = model.config.rope_parameters["rope_theta"] if hasattr(model.config, "rope_parameters") \
        else model.config.rope_theta
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(z):
        return z * cos + torch.cat([-z[..., d // 2:], z[..., :d // 2]], -1) * sin

    return attn, x, q, k, v, rope


def _attend(attn, q, k, v, fp=None, k_fp=None, v_fp=None):
    """Causal softmax attention written out per query; with `fp` masks, pair (i, j) reads k_fp/v_fp."""
    rep = q.shape[1] // k.shape[1]
    t, d = q.shape[2], q.shape[3]
    out = torch.zeros_like(q)
    for hq in range(q.shape[1]):
        hk = hq // rep
        for i in range(t):
            keys = k[0, hk, :i + 1].clone()
            vals = v[0, hk, :i + 1].clone()
            if fp is not None:
                keys[fp[0][i, :i + 1]] = k_fp[0, hk, :i + 1][fp[0][i, :i + 1]]
                vals[fp[1][i, :i + 1]] = v_fp[0, hk, :i + 1][fp[1][i, :i + 1]]
            p = torch.softmax(keys @ q[0, hq, i] / d ** 0.5, -1)
            out[0, hq, i] = p @ vals
    return attn.o_proj(out.transpose(1, 2).reshape(1, t, -1))


def _attn_output(model, tokens):
    got = {}
    attn = model.model.layers[0].self_attn
    h = attn.register_forward_hook(lambda m, a, o: [got.setdefault("y", o[0]), None][1])
    try:
        _logits(model, tokens)
    finally:
        h.remove()
    return got["y"]


def test_zero_v_codec_equals_hand_computed_attention_with_v_zero(tiny_reference):
    model = tiny_reference.model
    tokens = TOKENS[:1, :24]
    attn, x, q, k, v, rope = _layer0_qkv(model, tokens)
    with torch.no_grad():
        want = _attend(attn, rope(q), rope(k), torch.zeros_like(v))
        quantized, _ = _with_kv(model, v="toy_zero")
        torch.testing.assert_close(_attn_output(quantized, tokens), want, atol=1e-5, rtol=0)
        # with a residual window of 4 and 1 sink: V = 0 except the sink and the 4 most recent tokens
        t = tokens.shape[1]
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        v_fp = (j < 1) | (j > i - 4)
        want = _attend(attn, rope(q), rope(k), torch.zeros_like(v), (torch.ones(t, t, dtype=torch.bool), v_fp),
                       rope(k), v)
        quantized, _ = _with_kv(model, v="toy_zero", residual=4, sinks=1)
        torch.testing.assert_close(_attn_output(quantized, tokens), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("placement", ["post_rope", "pre_rope"])
def test_quantizing_the_cache_equals_a_hand_written_attention_with_quantized_cache(tiny_reference, placement):
    """post_rope: the codec sees the keys a cache stores (after k_norm and RoPE); pre_rope: k_norm's
    output, RoPE applied to the decoded keys."""
    from quantatlas.quant.codecs.ggml.q4_0 import Q4_0

    model = tiny_reference.model
    tokens = TOKENS[:1, :24]
    codec = Q4_0()
    attn, x, q, k, v, rope = _layer0_qkv(model, tokens)

    def fq(z):
        return codec.fake_quantize(z.reshape(-1, z.shape[-1])).reshape(z.shape)

    with torch.no_grad():
        k_stored = fq(rope(k)) if placement == "post_rope" else rope(fq(k))
        want = _attend(attn, rope(q), k_stored, fq(v))
        quantized, _ = _with_kv(model, k="q4_0", v="q4_0", placement=placement)
        got = _attn_output(quantized, tokens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        plain = _attend(attn, rope(q), rope(k), v)
        assert (got - plain).abs().max() > 1e-3  # the cache's quantization is visible


def test_channel_groups_and_residual_window_equal_a_hand_computed_cache(tiny_reference):
    """KIVI-style K: per channel over groups of G tokens, stored once the group is complete; the R
    most recent tokens (and the incomplete group) read in fp16; V per token with the same window."""
    from quantatlas.quant.codecs.uniform import Uniform, UniformConfig

    model = tiny_reference.model
    tokens = TOKENS[:1, :21]
    G, R = 4, 6
    codec = Uniform(UniformConfig(bits=2, group=None, symmetric=False))
    attn, x, q, k, v, rope = _layer0_qkv(model, tokens)
    t = tokens.shape[1]
    with torch.no_grad():
        kr = rope(k)
        k_q = kr.clone()
        for g0 in range(0, t - G + 1, G):       # each complete group: one row per channel (columns = tokens)
            blk = kr[0, :, g0:g0 + G]           # [heads, G, d]
            rows = blk.transpose(1, 2).reshape(-1, G)
            k_q[0, :, g0:g0 + G] = codec.fake_quantize(rows).reshape(blk.shape[0], -1, G).transpose(1, 2)
        v_q = codec.fake_quantize(v.reshape(-1, v.shape[-1])).reshape(v.shape)
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        k_end = G * ((i + 1 - R).clamp(min=0) // G)
        fp = (j >= k_end, j > i - R)
        want = _attend(attn, rope(q), k_q, v_q, fp, kr, v)
        cfg = {"uniform": {"bits": 2, "group": None, "symmetric": False}}
        quantized, kvq = _with_kv(model, k=cfg, v=cfg, k_granularity="channel", group_tokens=G, residual=R)
        torch.testing.assert_close(_attn_output(quantized, tokens), want, atol=1e-5, rtol=0)
    # bits: K rows of G = 4 values: 2 bits + fp16 scale and zero per 4 -> 10 bits; V rows of 32: 2 + 1 = 3
    b = kvq.bits(32, ctx=21)
    n_k = 4 * ((21 - 6) // 4)           # L(20) = 12 quantized keys, 9 fp16
    assert b["kv_bits_k"] == pytest.approx((n_k * 10 + (21 - n_k) * 16) / 21)
    assert b["kv_bits_v"] == pytest.approx((15 * 3 + 6 * 16) / 21)


# ---- llama.cpp cache types: the bytes of the cache blocks ------------------------------------------

@pytest.mark.parametrize("fmt", ["f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"])
def test_cache_types_store_the_bytes_gguf_quantizes(tiny_reference, fmt):
    """The K rows the cache stores, encoded by our codec, are the `gguf` package's bytes for those
    rows (IQ4_NL, which gguf cannot quantize: test_ggml_codecs' per-block transcription of
    quantize_row_iq4_nl_ref), and the keys attention reads are those bytes dequantized by `gguf`."""
    import gguf
    from gguf import quants

    from quantatlas.quant import kv as kv_module

    model = tiny_reference.model
    seen = {}
    original = kv_module.fake_quantize_heads

    def spy(x, codec):
        out = original(x, codec)
        if codec is not None and "k" not in seen:
            seen["k"], seen["stored"], seen["codec"] = x.detach().clone(), out.detach().clone(), codec
        return out

    quantized, q = _with_kv(model, k=fmt)
    kv_module.fake_quantize_heads = spy
    try:
        _logits(quantized, TOKENS[:1])
    finally:
        kv_module.fake_quantize_heads = original
    rows = seen["k"].reshape(-1, seen["k"].shape[-1]).float()
    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    if fmt == "iq4_nl":  # gguf has no IQ4_NL quantizer: the slow transcription of ggml-quants.c in test_ggml_codecs
        from test_ggml_codecs import ref_iq4_nl

        x = rows.numpy().astype(np.float32)
        want = np.frombuffer(b"".join(ref_iq4_nl(list(r), None) for r in x), np.uint8).reshape(x.shape[0], -1)
    else:
        want = quants.quantize(rows.numpy().astype(np.float32), qtype)
    ours = seen["codec"].encode(rows).data["values" if fmt == "f16" else "blocks"].numpy()
    assert ours.tobytes() == want.tobytes()
    deq = torch.from_numpy(quants.dequantize(want, qtype)).reshape(seen["stored"].shape)
    torch.testing.assert_close(seen["stored"].float(), deq.float(), atol=0, rtol=0)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert q.bits(32)["kv_bits_k"] == pytest.approx(8 * size / block)


# ---- rotation ---------------------------------------------------------------------------------

def test_rotation_quantizes_in_the_rotated_basis_and_is_seeded(tiny_reference):
    from quantatlas.quant.hadamard import RandomizedHadamard

    model = tiny_reference.model
    k_rows = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    k_rows[:, 5] *= 20                                       # an outlier channel
    q0, _ = _with_kv(model, k="q4_0", rotate=True, rotation_seed=7)
    half = q0.model.layers[0].self_attn._quantatlas_kv.k
    rot = RandomizedHadamard(32, 7)
    from quantatlas.quant.codecs.ggml.q4_0 import Q4_0

    want = rot.unrotate(Q4_0().fake_quantize(rot.rotate(k_rows)))
    torch.testing.assert_close(half.store(k_rows[None, None]).reshape(64, 32), want, atol=1e-6, rtol=0)
    plain = Q4_0().fake_quantize(k_rows)
    assert ((want - k_rows) ** 2).sum() < ((plain - k_rows) ** 2).sum()   # the rotation spreads the outlier
    # run seed s draws rotation_seed + s; different seeds, different logits
    a, b = _logits(_with_kv(model, 0, k="q4_0", rotate=True)[0]), _logits(_with_kv(model, 1, k="q4_0", rotate=True)[0])
    assert not torch.equal(a, b)
    assert KVCacheConfig(k="q4_0", rotate=True).seeded and not KVCacheConfig(k="q4_0").seeded
    assert not KVCacheConfig(rotate=True).seeded                                 # nothing quantized, nothing rotated


def test_rotate_auto_follows_llamacpp_head_dim_rule(tiny_reference):
    q = KVCacheQuantizer(KVCacheConfig(k="q4_0", rotate="auto"))
    assert q.rotates(64) and q.rotates(128) and not q.rotates(32) and not q.rotates(96)
    model = tiny_reference.model                               # head_dim 32: auto does not rotate
    auto, _ = _with_kv(model, k="q4_0", rotate="auto")
    plain, _ = _with_kv(model, k="q4_0")
    assert torch.equal(_logits(auto), _logits(plain))


# ---- config and bits ----------------------------------------------------------------------------

def test_config_errors_name_the_field_and_old_specs_keep_their_ids():
    from quantatlas.spec import parse_spec

    with pytest.raises(Exception, match="k_granularity"):
        KVCacheConfig(k="q8_0", k_granularity="tokens")
    with pytest.raises(Exception, match="rotate"):
        KVCacheConfig(k="q8_0", rotate="yes")
    base = {"title": "t", "arms": {"a": {"kv": {"k": "q8_0"}}}}
    same = {"title": "t", "arms": {"a": {"kv": {"k": "q8_0", "placement": "post_rope", "residual": 0,
                                                "rotate": False}}}}
    assert parse_spec(base).arms["a"].model_dump(exclude_defaults=True) == \
        parse_spec(same).arms["a"].model_dump(exclude_defaults=True) == {"kv": {"k": {"q8_0": {}}}}


def test_bits_count_codec_rows_and_fp16_windows(tiny_reference):
    q = KVCacheQuantizer(KVCacheConfig(k="q8_0", v={"uniform": {"bits": 4, "group": None}}))
    assert q.bits(64) == {"kv_bits_k": 8.5, "kv_bits_v": 4.25, "kv_bits": (8.5 + 4.25) / 2}
    kivi = KVCacheQuantizer(KVCacheConfig(k={"uniform": {"bits": 2, "group": None, "symmetric": False}},
                                          v={"uniform": {"bits": 2, "group": None, "symmetric": False}},
                                          k_granularity="channel", group_tokens=32, residual=128))
    b = kivi.bits(64, ctx=512)                    # 384 quantized tokens of 512
    assert b["kv_bits_k"] == pytest.approx((384 * 3 + 128 * 16) / 512)        # 2 + 32/32 per channel group
    assert b["kv_bits_v"] == pytest.approx((384 * 2.5 + 128 * 16) / 512)      # 2 + 32/64 per token row
    sinks = KVCacheQuantizer(KVCacheConfig(k="q4_0", sinks=4))
    assert sinks.bits(64, ctx=128)["kv_bits_k"] == pytest.approx((124 * 4.5 + 4 * 16) / 128)
    with pytest.raises(ValueError, match="ctx"):
        sinks.bits(64)
    bad, _ = None, None
    with pytest.raises(ValueError, match="kv.k"):
        KVCacheQuantizer(KVCacheConfig(k="q8_0", k_granularity="channel", group_tokens=16)).attach(
            copy.deepcopy(tiny_reference.model))


def test_a_kivi_spec_runs_and_reports_bits_at_the_eval_ctx(tiny_reference):
    from quantatlas.runner import run_spec
    from quantatlas.spec import parse_spec

    two = {"uniform": {"bits": 2, "group": None, "symmetric": False}}
    spec = parse_spec({"title": "kivi", "data": {"eval": {"tokens": 1024, "ctx": 64}}, "control": "kivi0",
                       "arms": {"kivi0": {"kv": {"k": two, "v": two, "k_granularity": "channel"}},
                                "kivi16": {"kv": {"k": two, "v": two, "k_granularity": "channel",
                                                  "residual": 16}}}})
    doc = run_spec(spec, ledger=False, loaded=tiny_reference, compress=False, log=lambda m: None)
    r = {name: arm["seeds"]["0"] for name, arm in doc["arms"].items()}
    assert r["kivi0"]["kv_bits_k"] == pytest.approx(3.0) and r["kivi0"]["kv_bits_v"] == pytest.approx(2.0 + 1.0)
    assert r["kivi16"]["kv_bits_k"] == pytest.approx((32 * 3 + 32 * 16) / 64)
    assert 0 < r["kivi16"]["kld_mean"] < r["kivi0"]["kld_mean"]


# ---- the fused mixed fp16/quantized attention against the two-matmul formula ---------------------

def _two_matmul_attention(query, key, key_q, value, value_q, k_fp, v_fp, attention_mask, scaling):
    """The formula the mixed attention used before it became one fused call (kept as the oracle):
    scores from both K versions selected per (query, key), softmax, P·V split by the V mask."""
    rep = query.shape[1] // key.shape[1]

    def heads(x):
        return x.repeat_interleave(rep, dim=1)

    tq, tk = query.shape[2], key.shape[2]
    scores = query @ heads(key).transpose(-1, -2)
    if k_fp is not None:
        scores = torch.where(k_fp, scores, query @ heads(key_q).transpose(-1, -2))
    scores = scores * scaling
    if attention_mask is None:
        i = torch.arange(tk - tq, tk)[:, None]
        scores = scores.masked_fill(torch.arange(tk)[None, :] > i, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    if v_fp is None:
        return (probs @ heads(value)).transpose(1, 2)
    return ((probs * v_fp) @ heads(value) + (probs * ~v_fp) @ heads(value_q)).transpose(1, 2)


@pytest.mark.parametrize("opts", [
    {"k": "q8_0", "v": "q8_0", "residual": 5},
    {"k": "q8_0", "v": "q8_0", "residual": 3, "sinks": 2},
    {"k": "q8_0", "sinks": 3},                                                     # V fp16: two copies
    {"v": "q8_0", "residual": 4},
    {"k": "q8_0", "v": "q8_0", "k_granularity": "channel", "group_tokens": 4, "residual": 6},  # KIVI: three
    {"k": "q8_0", "v": "q8_0", "k_granularity": "head", "v_granularity": "channel", "group_tokens": 3,
     "residual": 2, "sinks": 1}])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("min_rows", [64, 3])        # one block of query rows; blocks of 3 rows (7 blocks)
def test_fused_mixed_attention_equals_the_two_matmul_formula(opts, mask, min_rows, monkeypatch):
    from quantatlas.quant import kv
    from quantatlas.quant.kv import _Half, _LayerKV, _mixed_attention

    monkeypatch.setattr(kv, "MIXED_MIN_ROWS", min_rows)

    g = torch.Generator().manual_seed(3)
    b, hq, hk, t, d = 2, 4, 2, 19, 8                                   # GQA: 2 query heads per KV head
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h in (hq, hk, hk))
    k_q, v_q = k + torch.randn(k.shape, generator=g), v + torch.randn(v.shape, generator=g)
    cfg = KVCacheConfig(**opts)
    kq = KVCacheQuantizer(cfg)
    layer = _LayerKV(_Half(kq.k, cfg.k_granularity, cfg, None), _Half(kq.v, cfg.v_granularity, cfg, None),
                     "sdpa", False)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    causal[:, 0] &= torch.arange(t) != 7                                # a padded-out key, as a mask may say
    am = {"none": None, "bool": causal[None, None].expand(b, 1, t, t),
          "float": torch.zeros(b, 1, t, t).masked_fill(~causal, float("-inf"))}[mask]
    k_fp = None if kq.k is None else layer.k.fp_mask(t, t, "cpu")
    v_fp = None if kq.v is None else layer.v.fp_mask(t, t, "cpu")
    want = _two_matmul_attention(q, k, k_q, v, v_q, k_fp, v_fp, am, 0.3)
    got, _ = _mixed_attention(None, q, k, k_q, v, v_q, layer, am, scaling=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the window is visible (both copies matter) and the mask is built once per shape
    plain = _two_matmul_attention(q, k, k, v, v, None, None, am, 0.3)
    assert (got - plain).abs().max() > 0.1
    assert _mixed_attention(None, q, k, k_q, v, v_q, layer, am, scaling=0.3)[0].equal(got)
    assert len(layer.masks) == 1
    blocks = layer.masks[next(iter(layer.masks))][1]
    assert len(blocks) == (1 if min_rows == 64 else 7)
    if mask == "none" and min_rows == 3:      # causal blocks skip the keys they cannot see
        assert blocks[0][2] is not None and len(blocks[0][2]) < len(blocks[-1][2])
