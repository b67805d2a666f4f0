"""Channel equalization, AWQ and SmoothQuant's down group on mixture-of-experts models (issue 27, part 3).

gate_up: one scale on post_attention_layernorm's output, folded into the router and every expert's gate/up
(and a shared expert's); down: one scale per expert on its own down input, from the rows its router sends it.
Checked here: the logits and the routing are kept (fused and list forms, Qwen3-MoE, Mixtral, Qwen2-MoE with a
shared expert) and both forms get the same weights; every scale equals its formula computed in this file from
the norm's output hooked by hand, a routing computed from the router's weights (softmax, top-k) and each
expert's hidden computed from its weights; AWQ's alpha equals a brute-force search over the same grid with
per-expert Hessians built here; GPTQ runs after each transform."""
from __future__ import annotations

import copy

import pytest
import torch
from test_moe import _pipeline, calib_tokens, list_form, mixtral, qwen3_moe
from test_moe_transforms import BUILDS, _logits_and_routing

from quantatlas.models.layout import layout
from quantatlas.quant.codecs import make_codec
from quantatlas.quant.transforms import make_transform

pytestmark = pytest.mark.usefixtures("one_thread")

CODEC = {"uniform": {"bits": 3, "group": 16}}
TRANSFORMS = {
    "equalize": {"alpha": 0.5},
    "awq": {"grid": 5, "codec": CODEC},
    "smoothquant": {"alpha": 0.5, "roles": ["gate_up", "down"]},
}


# ---- what the transforms are checked against, computed here from the modules ------------------------

def _expert(mlp, e) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert e's (gate [I, H], up [I, H], down [H, I]) in float64, read off the block's own tensors."""
    if isinstance(mlp.experts, torch.nn.ModuleList):
        ex = mlp.experts[e]
        names = ("gate_proj", "up_proj", "down_proj") if hasattr(ex, "gate_proj") else ("w1", "w3", "w2")
        return tuple(getattr(ex, n).weight.detach().double().clone() for n in names)
    gate_up = mlp.experts.gate_up_proj[e].detach().double()
    inter = gate_up.shape[0] // 2
    return gate_up[:inter].clone(), gate_up[inter:].clone(), mlp.experts.down_proj[e].detach().double().clone()


def _shared(mlp):
    se = mlp.shared_expert
    return tuple(getattr(se, n).weight.detach().double().clone() for n in ("gate_proj", "up_proj", "down_proj"))


@torch.no_grad()
def _norm_outputs(model, tokens) -> dict[int, torch.Tensor]:
    """Every row of each layer's post_attention_layernorm output over `tokens` (a plain forward hook)."""
    seen: dict[int, list] = {}
    handles = [layer.post_attention_layernorm.register_forward_hook(
        lambda m, a, y, i=i: seen.setdefault(i, []).append(y.reshape(-1, y.shape[-1]).double()))
        for i, layer in enumerate(model.model.layers)]
    for b in range(0, tokens.shape[0], 8):
        model(tokens[b:b + 8], use_cache=False)
    for h in handles:
        h.remove()
    return {i: torch.cat(v) for i, v in seen.items()}


def _routed_rows(mlp, x, top_k=2) -> list[torch.Tensor]:
    """Per expert, the rows of x its router sends it: top-k of softmax(router logits) (renormalising the
    top-k weights, where a family does, does not change which experts are picked)."""
    probs = torch.softmax(x @ mlp.gate.weight.detach().double().T, -1)
    picked = probs.topk(top_k, -1).indices
    return [(picked == e).any(-1).nonzero().flatten() for e in range(probs.shape[1])]


def _hidden(gate, up, x):
    return torch.nn.functional.silu(x @ gate.T) * (x @ up.T)


def _by_hand(model, tokens):
    """Per layer: the norm output over every token, each expert's routed rows and hidden, the shared expert's
    hidden on every token (or None), and the weights before any transform (norm gain, router, experts)."""
    out = []
    for i, x in _norm_outputs(model, tokens).items():
        mlp = model.model.layers[i].mlp
        rows = _routed_rows(mlp, x)
        experts = [_expert(mlp, e) for e in range(len(rows))]
        hidden = [_hidden(g, u, x[r]) for (g, u, _), r in zip(experts, rows)]
        shared = _shared(mlp) if hasattr(mlp, "shared_expert") else None
        out.append({"x": x, "rows": rows, "experts": experts, "hidden": hidden, "shared": shared,
                    "shared_hidden": None if shared is None else _hidden(shared[0], shared[1], x),
                    "gamma": model.model.layers[i].post_attention_layernorm.weight.detach().double().clone(),
                    "router": mlp.gate.weight.detach().double().clone()})
    return out


@torch.no_grad()
def _vary_gains(model):
    """Post-attention norm gains away from the all-ones init, so the norm's output channels differ in size."""
    gen = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        w = layer.post_attention_layernorm.weight
        w.copy_(torch.rand(w.shape, generator=gen) * 1.5 + 0.25)
    return model


def _all_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- the function is kept; both expert forms get the same weights ------------------------------------

@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("name", list(BUILDS))
def test_logits_and_routing_are_kept(name, transform):
    model = BUILDS[name]()
    tokens, probe = calib_tokens(8, 24), calib_tokens(3, 20, seed=5)
    before, route_before = _logits_and_routing(model, probe)
    w0 = _all_weights(model)
    t = make_transform(transform, TRANSFORMS[transform])
    t.apply(model, tokens)
    after, route_after = _logits_and_routing(model, probe)
    # the folds did something to the MoE blocks: the post-attention norms and the experts' down moved (AWQ:
    # where its search did not choose alpha = 0, the identity)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, w0[n])}
    for i in range(2):
        if transform != "awq" or t.chosen[(i, "gate_up")] > 0:
            assert f"model.layers.{i}.post_attention_layernorm.weight" in moved
            assert f"model.layers.{i}.mlp.gate.weight" in moved
        if transform != "awq" or any(a > 0 for (j, k), a in t.chosen.items() if j == i and k.startswith("down/")):
            assert any(f"layers.{i}.mlp.experts" in n and ("down" in n or "w2" in n) for n in moved)
    if name == "qwen2_moe_shared" and transform != "awq":
        assert {"model.layers.0.mlp.shared_expert.down_proj.weight",
                "model.layers.0.mlp.shared_expert_gate.weight"} <= moved
    if transform == "awq":
        assert any(a > 0 for (_, k), a in t.chosen.items() if k not in ("qkv", "o"))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    for i in route_before:
        assert torch.equal(route_after[i], route_before[i])     # the same top-k experts for every token


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("build,names", [(qwen3_moe, ("gate_proj", "up_proj", "down_proj")),
                                         (mixtral, ("w1", "w3", "w2"))], ids=["qwen3_moe", "mixtral"])
def test_fused_and_list_forms_give_the_same_weights(build, names, transform):
    fused = build()
    listed = list_form(fused, names)
    tokens = calib_tokens(8, 24)
    t_fused, t_listed = (make_transform(transform, TRANSFORMS[transform]) for _ in range(2))
    t_fused.apply(fused, tokens)
    t_listed.apply(listed, tokens)
    if transform == "awq":
        assert t_fused.chosen == t_listed.chosen and any(a > 0 for a in t_fused.chosen.values())
    for lf, ll in zip(fused.model.layers, listed.model.layers):
        for key in ("input_layernorm", "post_attention_layernorm"):
            torch.testing.assert_close(getattr(ll, key).weight, getattr(lf, key).weight, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ll.mlp.gate.weight, lf.mlp.gate.weight, rtol=1e-5, atol=1e-7)
        for e in range(len(ll.mlp.experts)):
            for a, b in zip(_expert(ll.mlp, e), _expert(lf.mlp, e)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- the scales are the formulas ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen3_moe", "list_mixtral", "qwen2_moe_shared"])
def test_equalize_scales_are_h_diagonals(name):
    alpha = 0.4
    model = _vary_gains(BUILDS[name]())
    tokens = calib_tokens(8, 24)
    want = _by_hand(model, tokens)
    make_transform("equalize", {"alpha": alpha, "roles": ["gate_up", "down"]}).apply(model, tokens)
    for i, w in enumerate(want):
        mlp = model.model.layers[i].mlp
        s = (2 * (w["x"] ** 2).mean(0)) ** alpha                          # H_ii over every token, ^alpha
        assert s.std() > 0.05 * s.mean()
        torch.testing.assert_close(model.model.layers[i].post_attention_layernorm.weight.double(), w["gamma"] / s,
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mlp.gate.weight.double(), w["router"] * s, rtol=1e-5, atol=1e-7)
        for e, ((g, u, d), h) in enumerate(zip(w["experts"], w["hidden"])):
            assert len(h) > 0
            s_e = (2 * (h ** 2).mean(0)) ** alpha                          # its routed rows' hidden
            g1, u1, d1 = _expert(mlp, e)
            torch.testing.assert_close(g1, g * s, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(u1, u * s / s_e[:, None], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(d1, d * s_e, rtol=1e-4, atol=1e-7)
        if w["shared"] is not None:
            g, u, d = w["shared"]
            s_sh = (2 * (w["shared_hidden"] ** 2).mean(0)) ** alpha           # every token
            g1, u1, d1 = _shared(mlp)
            torch.testing.assert_close(g1, g * s, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(u1, u * s / s_sh[:, None], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(d1, d * s_sh, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["mixtral", "list_qwen3_moe", "qwen2_moe_shared"])
def test_smoothquant_down_scales_are_the_formula_per_expert(name):
    alpha = 0.6
    model = BUILDS[name]()
    tokens = calib_tokens(8, 24)
    want = _by_hand(model, tokens)
    make_transform("smoothquant", {"alpha": alpha, "roles": ["down"]}).apply(model, tokens)
    for i, w in enumerate(want):
        mlp = model.model.layers[i].mlp
        torch.testing.assert_close(model.model.layers[i].post_attention_layernorm.weight.double(), w["gamma"])
        pairs = list(zip(w["experts"], w["hidden"]))
        if w["shared"] is not None:
            pairs.append((w["shared"], w["shared_hidden"]))
        for e, ((g, u, d), h) in enumerate(pairs):
            s_e = h.abs().amax(0) ** alpha / d.abs().amax(0) ** (1 - alpha)   # max|X_j|^a / max|W_j|^(1-a)
            assert s_e.std() > 0.05 * s_e.mean()
            g1, u1, d1 = _expert(mlp, e) if e < len(w["experts"]) else _shared(mlp)
            torch.testing.assert_close(g1, g, rtol=0, atol=0)                 # gate is not the producer
            torch.testing.assert_close(u1, u / s_e[:, None], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(d1, d * s_e, rtol=1e-4, atol=1e-7)


def test_an_expert_no_token_reaches_keeps_scale_one():
    model = qwen3_moe(experts=8)
    tokens = calib_tokens(1, 4)                                        # 8 routed slots over 8 experts
    want = _by_hand(model, tokens)
    empty = [(i, e) for i, w in enumerate(want) for e, r in enumerate(w["rows"]) if len(r) == 0]
    assert empty and len(empty) < 16
    before = _all_weights(model)
    for name, opts in TRANSFORMS.items():
        m = copy.deepcopy(model)
        make_transform(name, {**opts, "roles": ["down"]}).apply(m, tokens)
        for i, w in enumerate(want):
            for e in range(8):
                moved = not torch.equal(m.model.layers[i].mlp.experts.down_proj[e],
                                        before[f"model.layers.{i}.mlp.experts.down_proj"][e])
                assert moved == ((i, e) not in empty), (name, i, e)


# ---- AWQ: a brute-force search over the same grid ---------------------------------------------------

def _awq_scale(m, alpha):
    s = m ** alpha
    return s / torch.sqrt(s.max() * s.min())


def _error(codec, pairs, s):
    """sum over (W, H) of tr(dW H dW^T), dW = Q(W diag(s)) diag(1/s) - W."""
    err = 0.0
    for w, h in pairs:
        w_hat = codec.decode(codec.encode((w * s[None, :]).float())).double() / s[None, :]
        d = w_hat - w
        err += float(torch.trace(d @ h @ d.T))
    return err


def _hessian(x):
    return 2 / max(len(x), 1) * x.T @ x


def _brute_force(codec, m, pairs, grid):
    errs = [_error(codec, pairs, _awq_scale(m, a / grid)) for a in range(grid)]
    best = min(range(grid), key=errs.__getitem__)
    return best / grid, errs


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe_shared"])
def test_awq_alpha_is_a_brute_force_search_with_per_expert_hessians(name):
    grid = 6
    model = BUILDS[name]()
    tokens = calib_tokens(8, 24)
    want = _by_hand(model, tokens)
    codec = make_codec("uniform", CODEC["uniform"])
    awq = make_transform("awq", {"grid": grid, "codec": CODEC, "roles": ["gate_up", "down"]})
    awq.apply(model, tokens)
    searched = 0
    for i, w in enumerate(want):
        # gate_up: m over every token; each expert's gate and up with its routed rows' H, the shared expert's
        # with every token's; the routers are not quantized
        pairs = [(wt, _hessian(w["x"][r])) for (g, u, _), r in zip(w["experts"], w["rows"]) for wt in (g, u)]
        if w["shared"] is not None:
            pairs += [(w["shared"][0], _hessian(w["x"])), (w["shared"][1], _hessian(w["x"]))]
        alpha, errs = _brute_force(codec, w["x"].abs().mean(0), pairs, grid)
        assert awq.chosen[(i, "gate_up")] == alpha and max(errs) > 1.01 * min(errs)
        s = _awq_scale(w["x"].abs().mean(0), alpha)
        torch.testing.assert_close(model.model.layers[i].post_attention_layernorm.weight.double(), w["gamma"] / s,
                                   rtol=1e-5, atol=1e-7)
        # down: each expert alone, m and H of its routed hidden
        downs = [(f"down/{e}", d, h) for e, ((_, _, d), h) in enumerate(zip(w["experts"], w["hidden"]))]
        if w["shared"] is not None:
            downs.append(("down/shared", w["shared"][2], w["shared_hidden"]))
        for key, d, h in downs:
            alpha, _ = _brute_force(codec, h.abs().mean(0), [(d, _hessian(h))], grid)
            assert awq.chosen[(i, key)] == alpha, (i, key)
            searched += alpha > 0
    assert searched > 0                    # some down scale is not the identity


def test_awq_hessians_one_layer_at_a_time_give_the_same_result():
    tokens = calib_tokens(8, 24)
    together, alone = qwen3_moe(), qwen3_moe()
    a = make_transform("awq", {"grid": 4, "codec": CODEC})
    b = make_transform("awq", {"grid": 4, "codec": CODEC})
    b.max_hessian_bytes = 0                  # every layer its own chunk (its own pass over the tokens)
    sites = {0: None, 1: None}
    assert len(a._chunks({i: _sites(together, i) for i in sites})) == 1
    assert len(b._chunks({i: _sites(alone, i) for i in sites})) == 2
    a.apply(together, tokens)
    b.apply(alone, tokens)
    assert a.chosen == b.chosen
    # layer 1's statistics are taken after layer 0's folds in `alone`: the same function, up to fp rounding
    for (n, p), q in zip(together.named_parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def _sites(model, index):
    from quantatlas.quant.transforms import _llama, _scales

    layer = _llama.layers(model)[index]
    return [s for g in ("qkv", "gate_up", "o", "down") for s in _scales.sites(layer, g)]


# ---- refusals and the pipeline ---------------------------------------------------------------------

def test_an_online_rotated_expert_down_is_refused():
    from quantatlas.quant.hadamard import RandomizedHadamard
    from quantatlas.quant.online import OnlineRotation, attach_online_rotation

    model = list_form(qwen3_moe())
    down = model.model.layers[1].mlp.experts[2].down_proj
    attach_online_rotation(down, OnlineRotation(RandomizedHadamard(32, seed=0)))
    with pytest.raises(ValueError, match="equalize: layer 1 has an online rotation on the input of down; "
                                         "apply equalize before hadamard"):
        make_transform("equalize", {}).apply(model, calib_tokens())
    make_transform("equalize", {"roles": ["qkv", "gate_up", "o"]}).apply(model, calib_tokens())


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_gptq_runs_after_each(transform):
    model = qwen3_moe()
    probe = calib_tokens(2, 16, seed=9)
    with torch.no_grad():
        ref = torch.log_softmax(model(probe).logits.double(), -1)
    opts = {k: v for k, v in TRANSFORMS[transform].items() if k != "codec"}   # AWQ takes the arm's codec
    qm = _pipeline(model, {"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 16}},
                           "moe": {"min_tokens": 1}, "transforms": [{transform: opts}]})
    with torch.no_grad():
        got = torch.log_softmax(qm.model(probe).logits.double(), -1)
    kld = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert 0 < kld < 1 and torch.isfinite(torch.tensor(kld))
    experts = {t.name + ".weight" for t in layout(qm.model).roles if t.expert is not None}
    assert len(experts) == 2 * 4 * 3 and experts <= set(qm.packed)
