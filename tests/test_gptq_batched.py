"""GPTQ on a batch of matrices with their own Hessians (a mixture-of-experts layer's experts of one role,
issue 27's time target): `gptq_batched` gives each matrix exactly what `gptq` gives it alone (bit for bit:
the same float operations, batched), and the pipeline's batched pass over a tiny Qwen3-MoE equals the one
matrix at a time pass. `gptq` itself is checked against a plain GPTQ in tests/test_gptq_fast.py."""
from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
import transformers as T

from quantatlas.quant.codecs import make_codec
from quantatlas.quant.quantize import quantize_model
from quantatlas.quant.recipe import build_recipe
from quantatlas.quant.solvers.gptq import GPTQ, GPTAQConfig, GPTQConfig, batchable, gptq, gptq_batched
from quantatlas.spec import Arm

G = sys.modules["quantatlas.quant.solvers.gptq"]

pytestmark = pytest.mark.usefixtures("one_thread")


def problems(E=5, rows=24, cols=64, n=256, seed=0):
    """E matrices with Hessians of different scales and correlations; matrix 1 has two dead inputs."""
    g = torch.Generator().manual_seed(seed)
    Ws, Hs = [], []
    for e in range(E):
        mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
        X = (torch.randn(n, cols, generator=g) @ mix) * torch.exp(0.7 * torch.randn(cols, generator=g))
        if e == 1:
            X[:, [3, 40]] = 0
        Ws.append(torch.randn(rows, cols, generator=g) * (1 + e))
        Hs.append((2.0 / n) * X.T @ X)
    return Ws, Hs


def alone(Ws, Hs, codec, **opts):
    return [gptq(W, H.clone(), codec, losses=False, overwrite_h=True, **opts)[:2] for W, H in zip(Ws, Hs)]


def assert_same(got, want):
    assert len(got) == len(want)
    for (w_hat, packed), (w_ref, p_ref) in zip(got, want):
        assert torch.equal(w_hat, w_ref)
        assert packed.shape == p_ref.shape and packed.data.keys() == p_ref.data.keys()
        for k in packed.data:
            assert torch.equal(packed.data[k], p_ref.data[k]), k


@pytest.mark.parametrize("codec,options", [
    ({"name": "uniform", "bits": 3, "group": 16}, {"act_order": True, "static_groups": True}),
    ({"name": "uniform", "bits": 4, "group": 16, "symmetric": False}, {"act_order": False, "static_groups": True}),
    ({"name": "uniform", "bits": 2, "group": None}, {"act_order": False, "static_groups": False}),
    ({"name": "uniform", "bits": 4, "group": None}, {"act_order": True, "static_groups": False}),
    ({"name": "mx", "element": "fp4_e2m1", "block": 32}, {"act_order": True, "static_groups": True}),
], ids=["int3_g16_ao", "int4_g16_asym_static", "int2_row", "int4_row_ao", "mxfp4_ao"])
@pytest.mark.parametrize("block_size", [128, 24])
def test_batched_equals_one_at_a_time(codec, options, block_size):
    codec = make_codec(codec["name"], {k: v for k, v in codec.items() if k != "name"})
    Ws, Hs = problems()
    assert all(batchable(codec, W) for W in Ws)
    got = gptq_batched(Ws, [H.clone() for H in Hs], codec, block_size=block_size, **options)
    assert_same(got, alone(Ws, Hs, codec, block_size=block_size, **options))


def test_batches_of_a_limited_size_give_the_same(monkeypatch):
    codec = make_codec("uniform", {"bits": 3, "group": 16})
    Ws, Hs = problems(E=7)
    want = gptq_batched(Ws, [H.clone() for H in Hs], codec, act_order=True, static_groups=True)
    monkeypatch.setattr(G, "BATCH_WEIGHTS", 3 * 24 * 64)    # three matrices per batch: 3 + 3 + 1
    calls = []
    inner = G.gptq_batched

    def counted(Ws, *a, **k):
        calls.append(len(Ws))
        return inner(Ws, *a, **k)
    monkeypatch.setattr(G, "gptq_batched", counted)
    got = G.gptq_batched(Ws, [H.clone() for H in Hs], codec, act_order=True, static_groups=True)
    assert calls == [7, 3, 3, 1]
    assert_same(got, want)


def test_what_cannot_be_batched():
    W = torch.randn(8, 32)
    assert not batchable(make_codec("nvfp4", {}), W)            # a tensor scale fixed per matrix
    assert not batchable(make_codec("e8p", {"bits": 2}), W)     # a vector codec (8 columns at a time)
    assert not batchable(make_codec("uniform", {"bits": 4}), W.double())
    Ws, Hs = problems(E=2)
    with pytest.raises(ValueError, match="on the fly"):
        gptq_batched(Ws, Hs, make_codec("uniform", {"bits": 3, "group": 16}), act_order=False, static_groups=False)
    with pytest.raises(ValueError, match="one shape"):
        gptq_batched([Ws[0], Ws[1][:, :32]], [Hs[0], Hs[1][:32, :32]], make_codec("uniform", {"bits": 3, "group": 16}))
    uniform = make_codec("uniform", {"bits": 3})
    assert GPTQConfig().build().can_batch(uniform, W)
    assert not GPTQConfig(incoherence=True).build().can_batch(uniform, W)   # random signs per matrix
    assert not GPTAQConfig().build().can_batch(uniform, W)                  # a cross term per matrix


def qwen3_moe():
    cfg = T.Qwen3MoeConfig(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                           num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, norm_topk_prob=True, max_position_embeddings=256)
    torch.manual_seed(0)
    model = T.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or "experts" in name:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("arm", [
    {"solver": "gptq", "codec": {"uniform": {"bits": 3, "group": 16}}},
    {"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 16}}, "propagation": "layer",
     "moe": {"weighting": "routing"}},
], ids=["sequential", "layer_routing"])
def test_pipeline_batches_experts_and_gets_the_same_model(monkeypatch, arm):
    model = qwen3_moe()
    calib = torch.from_numpy(np.random.default_rng(1).integers(0, 300, (4, 24)))
    batched_model, alone_model = model, copy.deepcopy(model)
    sizes = []
    batch_solve = GPTQ.solve_batch

    def counted(self, Ws, stats, codec):
        sizes.append(len(Ws))
        return batch_solve(self, Ws, stats, codec)
    monkeypatch.setattr(GPTQ, "solve_batch", counted)
    packed = quantize_model(batched_model, build_recipe(Arm(**arm)), calib, 0)
    # every expert of a role with enough routed tokens goes in one batch per layer (starved ones are rounded)
    assert sizes and max(sizes) > 1
    monkeypatch.setattr(GPTQ, "can_batch", lambda self, codec, W: False)
    sizes.clear()
    want = quantize_model(alone_model, build_recipe(Arm(**arm)), calib, 0)
    assert not sizes
    assert packed.keys() == want.keys()
    for name in want:
        for k in want[name].data:
            assert torch.equal(packed[name].data[k], want[name].data[k]), (name, k)
    for (n, a), (_, b) in zip(batched_model.state_dict().items(), alone_model.state_dict().items()):
        assert torch.equal(a, b), n
