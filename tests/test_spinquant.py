"""SpinQuant: the Cayley optimizer against a direct computation, orthogonality, function preservation,
steps: 0 == hadamard, the training loss going down, refusals."""
import copy

import pytest
import torch

from quantatlas.context import RunContext
from quantatlas.errors import UserError
from quantatlas.quant.act import ActConfig
from quantatlas.quant.cayley import CayleySGD, orthogonality_error
from quantatlas.quant.config import ConfigError, parse_config
from quantatlas.quant.kv import KVCacheConfig
from quantatlas.quant.transforms import make_transform

VOCAB, HIDDEN = 96, 64
TOKENS = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))


def tiny(kind: str, tie: bool = False):
    """2-layer Llama (q/k/v/o biases) or Qwen3 (q/k norms) with GQA, random weights and norm gains."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
               tie_word_embeddings=tie)
    model = (LlamaForCausalLM(LlamaConfig(attention_bias=True, **cfg)) if kind == "llama"
             else Qwen3ForCausalLM(Qwen3Config(**cfg)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            else:
                p.normal_(0, 0.1)
    return model.eval()


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def bound(opts, bits=3):
    """A spinquant transform with int`bits` g16 weights, W4A4 activations and int4 KV in the loop."""
    t = make_transform("spinquant", {"samples": 4, "seq_len": 24, "batch": 4, **opts})
    kv4 = {"uniform": {"bits": 4, "group": 16, "symmetric": False}}
    t.bind(parse_config("codec", {"uniform": {"bits": bits, "group": 16}}).build(),
           ActConfig.model_validate({"scheme": "W4A4"}), KVCacheConfig.model_validate({"k": kv4, "v": kv4}))
    return t


def random_orthogonal(n, p=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, p or n, generator=g, dtype=torch.float64))
    return q


# ---- the optimizer ---------------------------------------------------------------------------------

def test_cayley_step_is_the_cayley_transform():
    """Square X, no momentum: Y = (I − α/2 W)⁻¹ (I + α/2 W) X with W = ½ (X Gᵀ − G Xᵀ), written out."""
    x = random_orthogonal(8)
    g = torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = torch.nn.Parameter(x.clone())
    p.grad = g.clone()
    CayleySGD([p], lr=0.05).step()
    w = 0.5 * (x @ g.T - g @ x.T)
    eye = torch.eye(8, dtype=torch.float64)
    want = torch.linalg.inv(eye - 0.025 * w) @ (eye + 0.025 * w) @ x
    assert torch.allclose(p.detach(), want, atol=1e-12)
    # the step bound: with a huge lr, α = 1 / ‖W‖₁ (largest column sum)
    p2 = torch.nn.Parameter(x.clone())
    p2.grad = g.clone()
    CayleySGD([p2], lr=1e6).step()
    a = 1 / float(w.abs().sum(0).max())
    assert torch.allclose(p2.detach(), torch.linalg.inv(eye - a / 2 * w) @ (eye + a / 2 * w) @ x, atol=1e-12)


def test_cayley_on_a_stiefel_matrix_with_momentum_matches_the_paper():
    """X [8, 3]: Algorithm 1 of Li et al. 2020 step by step (momentum 0.5, two steps), inverse written out."""
    x = random_orthogonal(8, 3)
    grads = [torch.randn(8, 3, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (2, 3)]
    p = torch.nn.Parameter(x.clone())
    opt = CayleySGD([p], lr=0.1, momentum=0.5)
    m, want = torch.zeros(8, 3, dtype=torch.float64), x.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        m = 0.5 * m - g
        w_hat = m @ want.T - 0.5 * want @ (want.T @ m @ want.T)
        w = w_hat - w_hat.T
        m = w @ want
        alpha = min(0.1, 1.0 / (float(w.abs().sum(0).max()) + 1e-8))
        eye = torch.eye(8, dtype=torch.float64)
        want = torch.linalg.inv(eye - alpha / 2 * w) @ (eye + alpha / 2 * w) @ want
        assert torch.allclose(p.detach(), want, atol=1e-12)
    assert orthogonality_error(p) < 1e-12


def test_cayley_descends_to_the_procrustes_solution():
    """min ‖X − A‖² over rotations: every step lowers it, and X reaches A's polar factor U Vᵀ."""
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u, _, vt = torch.linalg.svd(a)
    polar = u @ vt
    x = random_orthogonal(6, seed=5)
    if torch.det(x) * torch.det(polar) < 0:   # the same connected component of O(6)
        x[:, 0] = -x[:, 0]
    p = torch.nn.Parameter(x)
    opt = CayleySGD([p], lr=0.1)
    losses = []
    for _ in range(300):
        loss = ((p - a) ** 2).sum()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(b <= a_ + 1e-12 for a_, b in zip(losses, losses[1:]))
    assert torch.allclose(p.detach(), polar, atol=1e-6)
    assert orthogonality_error(p) < 1e-12


def test_cayley_refuses_what_is_not_a_float64_matrix():
    with pytest.raises(ValueError, match="float64"):
        CayleySGD([torch.nn.Parameter(torch.eye(4))], lr=1.0)


# ---- the transform ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,tie", [("llama", True), ("qwen3", False)])
def test_learned_rotations_keep_the_fp_function_and_stay_orthogonal(kind, tie):
    model = tiny(kind, tie)
    before = logits(model)
    t = bound({"steps": 6, "lr": 5.0, "online": ["o", "down"]})
    t.apply(model, TOKENS, RunContext(1))
    assert len(t.history) == 6
    after = logits(model)   # the quantizers of the loop are gone, the rotated fp weights stay
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    assert model.config._attn_implementation != "quantatlas_kv"
    r1, r2 = t.rotations["r1"], t.rotations["r2"]
    assert orthogonality_error(r1) < 1e-5 and max(orthogonality_error(r) for r in r2) < 1e-5
    start = make_transform("spinquant", {"steps": 0})
    start.apply(tiny(kind, tie), None, RunContext(1))
    assert (r1 - start.rotations["r1"]).abs().max() > 1e-3     # R1 was learned, not left at its start
    assert max((a - b).abs().max() for a, b in zip(r2, start.rotations["r2"])) > 1e-3


def test_steps_zero_is_the_hadamard_transform():
    a, b = tiny("llama"), tiny("llama")
    make_transform("spinquant", {"steps": 0, "online": ["o", "down"]}).apply(a, None, RunContext(2))
    make_transform("hadamard", {"online": ["o", "down"]}).apply(b, None, RunContext(2))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    assert torch.allclose(logits(a), logits(b), atol=1e-5)


def test_training_lowers_the_quantized_loss():
    """Full batch: the KL of the quantized tiny model to its fp self goes down over the steps."""
    t = bound({"steps": 30, "lr": 20.0, "momentum": 0.9}, bits=2)
    t.apply(tiny("qwen3"), TOKENS, RunContext(0))
    h = t.history
    assert h[0] > 0
    assert sum(h[-5:]) / 5 < 0.9 * h[0]


def test_learn_only_r2_keeps_r1_at_the_hadamard():
    t = bound({"steps": 3, "lr": 5.0, "learn": ["r2"]})
    t.apply(tiny("qwen3"), TOKENS, RunContext(1))
    start = make_transform("spinquant", {"steps": 0})
    start.apply(tiny("qwen3"), None, RunContext(1))
    assert torch.equal(t.rotations["r1"], start.rotations["r1"])


@pytest.mark.parametrize("opts,where", [
    ({"steps": -1}, "spinquant.steps"),
    ({"lr": 0}, "spinquant.lr"),
    ({"momentum": 1.0}, "spinquant.momentum"),
    ({"batch": 8, "samples": 4}, "batch"),
    ({"learn": ["r3"]}, "spinquant.learn"),
    ({"learn": []}, "nothing to train"),
    ({"online": ["q"]}, "spinquant.online"),
    ({"seq": 3}, "seq"),
])
def test_bad_options_are_config_errors(opts, where):
    with pytest.raises(ConfigError, match=where):
        parse_config("transform", {"spinquant": opts})


def test_too_few_calibration_windows_is_refused_before_any_edit():
    model = tiny("qwen3")
    fresh = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="spinquant.samples"):
        make_transform("spinquant", {"samples": 8, "batch": 4}).apply(model, TOKENS, RunContext(0))
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


def test_moe_models_are_checked_like_dense_ones():
    """MoE models are rotated (tests/test_moe_rotations.py); apply's refusals come before any edit there too."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2))
    fresh = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="spinquant.seq_len"):
        make_transform("spinquant", {"steps": 2, "samples": 4}).apply(model, TOKENS, RunContext(0))
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


def test_the_arm_binds_its_quantizers_and_refuses_static_activations():
    from quantatlas.quant.steps.transforms import apply_transforms
    from quantatlas.spec import Arm, parse_spec

    arm = Arm.model_validate({
        "codec": {"uniform": {"bits": 3, "group": 16}}, "act": {"scheme": "W4A4"},
        "kv": {"k": {"uniform": {"bits": 4, "group": 16}}, "rotate": True},
        "transforms": [{"spinquant": {"steps": 2, "lr": 5.0, "samples": 4, "seq_len": 24, "batch": 4}}]})
    model = tiny("qwen3")
    before = logits(model)
    apply_transforms(model, arm, TOKENS, RunContext(0))
    assert (logits(model) - before).abs().max() < 1e-4 * before.abs().max()
    with pytest.raises(UserError, match="spinquant"):
        parse_spec({"title": "t", "model": "reference", "arms": {"a": {
            "codec": {"uniform": {"bits": 4, "group": 16}}, "transforms": [{"spinquant": {}}],
            "act": {"codec": {"fp8": {"granularity": "tensor"}}, "static": True}}}})
