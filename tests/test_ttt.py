"""Score-first test-time training (eval/ttt.py): a window's scores never see its own tokens nor later
ones; the loop equals a direct slow implementation (score with θ_i, then hand-written SGD/Adam steps
with the chain rule written out); the model and the standard metrics are untouched; the spec, the
harness and the verdict carry `<metric>_ttt` beside the standard metrics. Tiny models: seconds."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from quantatlas import runner
from quantatlas.eval.ttt import TTTConfig, evaluate_ttt, norm_params, ttt_scored_logits, window_loss
from quantatlas.eval.windows import EvalSet, make_eval_set, scored_logits
from quantatlas.quant.config import build
from quantatlas.spec import SpecError, parse_spec

QUIET = dict(ledger=False, compress=False, log=lambda m: None)
VOCAB, CTX, WINDOWS = 48, 16, 5


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Qwen3 (float32) whose matrices are int4 g8 (weights set to their decoded packs)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    codec = build("codec", {"uniform": {"bits": 4, "group": 8}})
    packed = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                packed[name] = codec.encode(p.detach().float())
                p.copy_(codec.decode(packed[name]).reshape(p.shape))
            elif name.endswith("norm.weight"):   # gains away from 1, so that they matter
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return model, packed


def eval_set(seed: int = 1) -> EvalSet:
    tokens = torch.randint(0, VOCAB, (WINDOWS * CTX,), generator=torch.Generator().manual_seed(seed)).numpy()
    return make_eval_set(tokens, WINDOWS * CTX, CTX)


def ttt_logits(model, packed, es, cfg, seed=0):
    return [out.clone() for _, out in ttt_scored_logits(model, es, cfg, packed, seed, "cpu")]


CONFIGS = [TTTConfig(params="norms", lr=0.05, steps_per_window=2),
           TTTConfig(params="scales", lr=0.05, optimizer="sgd"),
           TTTConfig(params="lora", lr=0.05, rank=2)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.params)
def test_a_windows_scores_do_not_change_when_its_last_token_and_later_windows_change(tiny, cfg, one_thread):
    """Score-first: window j's scored logits (positions first .. ctx-2) see tokens up to ctx-2 only, and
    the parameters θ_j trained on windows 0 .. j-1. Changing window j's LAST token (the target of its
    last scored position) and every later window leaves windows 0 .. j exactly as they were; a loop that
    trained on a window before scoring it would change window j (checked below), and window j+1, scored
    after training on the changed window j, does change (so training uses the windows)."""
    model, packed = tiny
    es = eval_set()
    before = ttt_logits(model, packed, es, cfg)
    j = 2
    altered = es.windows.clone()
    altered[j, -1] = (altered[j, -1] + 1) % VOCAB
    altered[j + 1:] = torch.randint(0, VOCAB, altered[j + 1:].shape, generator=torch.Generator().manual_seed(9))
    after = ttt_logits(model, packed, EvalSet(altered, es.first, "altered"), cfg)
    for i in range(j + 1):
        assert torch.equal(before[i], after[i]), f"window {i} changed"
    assert not torch.allclose(before[j + 1], after[j + 1])

    # the same check catches a train-then-score loop: there, window j's scores see its own last token
    def train_first(windows):
        from torch.func import functional_call

        from quantatlas.eval.ttt import optimizer, trainable
        train = trainable(model, cfg, packed, 0)
        opt = optimizer(cfg, train.params)
        out = []
        for i in range(windows.shape[0]):
            x = windows[i:i + 1]
            loss = window_loss(functional_call(model, train.overrides(), (x,)).logits, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                out.append(functional_call(model, train.overrides(), (x,)).logits[0, es.first:-1])
        return out
    assert not torch.equal(train_first(es.windows)[j], train_first(altered)[j])


def test_the_first_window_is_scored_by_the_quantized_model_itself(tiny, one_thread):
    model, packed = tiny
    es = eval_set()
    standard = [out for _, out in scored_logits(model, es, 8, "cpu")][0][:es.scored_per_window]
    for cfg in CONFIGS:
        torch.testing.assert_close(ttt_logits(model, packed, es, cfg)[0], standard, rtol=1e-5, atol=1e-5)


def _direct(model, packed, es, cfg, seed=0):
    """The slow reference: a copy of the model whose weights are written in place before every window;
    score window i with θ_i; then `steps_per_window` steps, each: the plain model's gradient w.r.t. the
    weights it sees, the chain rule to θ written out, and the optimizer's update written out."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    if cfg.params == "norms":
        theta = {n: params[n].detach().clone() for n in norm_params(m)}
    elif cfg.params == "scales":
        theta = {n: torch.ones(pk.shape[0], pk.data["scale"].numel() // pk.shape[0]) for n, pk in packed.items()}
    else:
        from quantatlas.eval.ttt import lora_adapters
        theta = {}
        for n, (_, a, b) in lora_adapters(m, cfg.lora_rank, seed).items():
            theta[n + ":A"], theta[n + ":B"] = a.detach().clone(), b.detach().clone()
    w0 = {n: params[n].detach().clone() for n in params}
    state = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in theta.items()}
    t = 0

    def write():
        with torch.no_grad():
            for n, v in theta.items():
                if cfg.params == "norms":
                    params[n].copy_(v)
                elif cfg.params == "scales":
                    params[n].copy_(w0[n] * v.repeat_interleave(w0[n].shape[1] // v.shape[1], 1))
                elif n.endswith(":A"):
                    w = n[:-2]
                    params[w].copy_(w0[w] + theta[w + ":B"] @ v)

    def grads():
        g = {}
        for n, v in theta.items():
            w = n.split(":")[0]
            gw = params[w].grad
            if cfg.params == "norms":
                g[n] = gw.clone()
            elif cfg.params == "scales":   # W = W0 ⊙ expand(m): dL/dm = sum over the group of dL/dW ⊙ W0
                k = w0[w].shape[1] // v.shape[1]
                g[n] = (gw * w0[w]).reshape(v.shape[0], v.shape[1], k).sum(-1)
            elif n.endswith(":A"):         # W = W0 + B A: dL/dA = Bᵀ dL/dW, dL/dB = dL/dW Aᵀ
                g[n] = theta[w + ":B"].T @ gw
            else:
                g[n] = gw @ theta[w + ":A"].T
        return g

    scored = []
    for i in range(es.windows.shape[0]):
        x = es.windows[i:i + 1]
        write()
        with torch.no_grad():
            scored.append(m(x).logits[0, es.first:-1].clone())
        if i == es.windows.shape[0] - 1:
            break
        for _ in range(cfg.steps_per_window):
            write()
            for n in {k.split(":")[0] for k in theta}:
                params[n].requires_grad_(True)
                params[n].grad = None
            logp = torch.log_softmax(m(x).logits[0, :-1].float(), -1)
            (-logp.gather(1, x[0, 1:, None]).mean()).backward()
            g = grads()
            t += 1
            for n in theta:
                if cfg.optimizer == "sgd":
                    theta[n] = theta[n] - cfg.lr * g[n]
                else:   # Adam, torch's defaults: betas (0.9, 0.999), eps 1e-8, bias-corrected
                    mu, nu = state[n]
                    mu, nu = 0.9 * mu + 0.1 * g[n], 0.999 * nu + 0.001 * g[n] ** 2
                    state[n] = (mu, nu)
                    theta[n] = theta[n] - cfg.lr * (mu / (1 - 0.9 ** t)) / ((nu / (1 - 0.999 ** t)).sqrt() + 1e-8)
            for n in {k.split(":")[0] for k in theta}:
                params[n].requires_grad_(False)
    return scored


@pytest.mark.parametrize("cfg", [TTTConfig(params="norms", lr=0.02, optimizer="sgd", steps_per_window=2),
                                 TTTConfig(params="norms", lr=0.01),
                                 TTTConfig(params="scales", lr=0.02),
                                 TTTConfig(params="lora", lr=0.02, rank=3, optimizer="sgd")],
                         ids=["norms-sgd", "norms-adam", "scales-adam", "lora-sgd"])
def test_the_loop_equals_a_direct_slow_implementation(tiny, cfg, one_thread):
    model, packed = tiny
    es = eval_set(3)
    fast, slow = ttt_logits(model, packed, es, cfg), _direct(model, packed, es, cfg)
    for i, (a, b) in enumerate(zip(fast, slow)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"window {i}")
    assert not torch.allclose(fast[-1], ttt_logits(model, packed, es, TTTConfig(params=cfg.params, lr=1e-9))[-1],
                              atol=1e-4)   # it trained: not the untrained model's scores


def test_the_model_is_left_as_it_was(tiny, one_thread):
    model, packed = tiny
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    es = eval_set()
    ref = np.zeros((es.n_scored, VOCAB), np.float32) - math.log(VOCAB)
    fp = copy.deepcopy(model)
    for cfg in CONFIGS:
        evaluate_ttt(model, fp, es, ref, cfg, packed, 0, "cpu")
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def _spec(arms, **extra):
    return parse_spec({"title": "t", "data": {"eval": {"tokens": 1024, "ctx": 128}, "calib": {"samples": 4,
                       "seq_len": 64}}, "arms": arms, **extra})


def test_the_harness_reports_ttt_beside_the_standard_metrics_which_stay_the_same(tiny_reference, one_thread):
    int3 = {"uniform": {"bits": 3, "group": 32}}
    norms = {"params": "norms", "lr": 0.01}
    spec = _spec({"int3": {"codec": int3}, "int3_ttt": {"codec": int3, "ttt": norms},
                  "int3_scales": {"codec": int3, "ttt": {"params": "scales", "lr": 0.01}},
                  "fp16_ttt": {"codec": None, "ttt": norms}})
    doc = runner.run_spec(spec, loaded=tiny_reference, **QUIET)
    plain, ttt, scales, fp = (doc["arms"][a]["seeds"]["0"] for a in ("int3", "int3_ttt", "int3_scales", "fp16_ttt"))
    for r in (ttt, scales):   # the standard metrics: untouched by TTT
        assert all(r[k] == plain[k] for k in plain if k != "seconds")
    assert not any(k.endswith("_ttt") or "_ttt_" in k for k in plain)
    for k in ("kld_mean_ttt", "delta_bpb_ttt", "bpb_ttt", "bpb_base_ttt", "kld_mean_ttt_vs_fp",
              "delta_bpb_ttt_vs_fp", "ttt_cpu_s", "ttt_fp_cpu_s", "ttt_trained_params"):
        assert k in ttt and math.isfinite(ttt[k]) and k in scales
    assert ttt["kld_mean_ttt"] != ttt["kld_mean"] and ttt["ttt_steps"] == 7   # 8 windows, none after the last
    assert ttt["ttt_tokens"] == 7 * 127
    # both sides adapt: the fp side of an arm is the fp16 arm's TTT, and the gap is against it
    assert ttt["bpb_base_ttt"] == fp["bpb_ttt"] != fp["bpb_base"]
    assert ttt["delta_bpb_ttt"] == pytest.approx(ttt["bpb_ttt"] - fp["bpb_ttt"], abs=1e-12)
    assert ttt["delta_bpb_ttt_vs_fp"] == pytest.approx(ttt["bpb_ttt"] - plain["bpb_base"], abs=1e-12)
    assert fp["kld_mean"] == 0 and fp["kld_mean_ttt"] == 0 and fp["delta_bpb_ttt"] == 0
    assert fp["kld_mean_ttt_vs_fp"] > 0                       # TTT moves the fp model off itself
    assert scales["bpb_base_ttt"] != fp["bpb_ttt"]            # the fp side trained the same multipliers
    # the arm keys: an arm with ttt is its own arm; one without keeps its key
    assert doc["arms"]["int3"]["key"] != doc["arms"]["int3_ttt"]["key"]
    assert "ttt" not in doc["arms"]["int3"]["config"]
    assert "KLD TTT" in runner.format_table(doc)


def test_spec_refuses_what_ttt_cannot_do():
    with pytest.raises(SpecError, match="ttt.*scales.*quantizes none"):
        _spec({"a": {"codec": None, "ttt": {"params": "scales"}}})
    with pytest.raises(SpecError, match="rank is the LoRA"):
        _spec({"a": {"codec": None, "ttt": {"params": "norms", "rank": 8}}})
    with pytest.raises(SpecError, match="arms.a.ttt.params"):
        _spec({"a": {"ttt": {"params": "weights"}}})
    assert _spec({"a": {"ttt": {"params": "lora"}}}).arms["a"].seeded          # A is drawn from the seed
    assert not _spec({"a": {"ttt": {"params": "norms"}}}).arms["a"].seeded


def test_an_arm_without_ttt_keeps_its_spec_id():
    """The `ttt` step came after results were stored: an arm without it dumps no `ttt` key, so ids and
    arm keys are what they were."""
    spec = _spec({"int3": {"solver": "gptq", "codec": {"uniform": {"bits": 3, "group": 128}}}})
    assert "ttt" not in spec.to_dict()["arms"]["int3"]
    assert spec.spec_hash() == "f8df40b1552b66be"   # computed with the ttt step left out of the registry


def test_a_verdict_judges_a_ttt_criterion_and_reads_a_control_without_ttt_by_its_standard_metric():
    from quantatlas.atlas.verdict import SeedRun, judge_run_set
    from quantatlas.spec import Criterion

    crit = Criterion(metric="delta_bpb_ttt", min_effect=0.1)
    control = {s: SeedRun(s, {"delta_bpb": 0.10 + 0.001 * s}) for s in range(3)}
    ttt = {s: SeedRun(s, {"delta_bpb": 0.10 + 0.001 * s, "delta_bpb_ttt": 0.06 + 0.002 * s}) for s in range(3)}
    out = judge_run_set({"q": control, "q_ttt": ttt}, ["q", "q_ttt"], "q", crit, None, {"q": True, "q_ttt": True},
                        {})
    j = out["q_ttt"]
    assert j.control_mean == pytest.approx(0.101) and j.treatment_mean == pytest.approx(0.062)
    assert j.result == "success" and j.effect == pytest.approx(0.039 / 0.101)
    # a TTT arm without the metric is not read by its standard one
    broken = {s: SeedRun(s, {"delta_bpb": 0.05}) for s in range(3)}
    spec_arms = {"q": {"codec": None}, "q_ttt": {"codec": None, "ttt": {"params": "norms"}}}
    out = judge_run_set({"q": control, "q_ttt": broken}, ["q", "q_ttt"], "q", crit, _Stored(spec_arms),
                        {"q": True, "q_ttt": True}, {})
    assert out["q_ttt"].rule == "no_pairs"


class _Stored:
    def __init__(self, arms):
        self.arms = arms


def test_a_lora_arm_is_one_arm_whether_its_default_rank_is_written_or_not():
    from quantatlas.atlas import ids
    from quantatlas.eval.ttt import LORA_RANK, TTTConfig

    assert TTTConfig(params="lora") == TTTConfig(params="lora", rank=LORA_RANK)
    assert TTTConfig(params="lora").rank == LORA_RANK and TTTConfig(params="norms").rank is None
    spec = {"title": "t", "model": "reference", "control": "a",
            "arms": {"a": {"codec": {"uniform": {"bits": 4}}}, "b": {"codec": {"uniform": {"bits": 4}}, "ttt": {"params": "lora"}}}}
    written = {**spec, "arms": {**spec["arms"], "b": {"codec": {"uniform": {"bits": 4}}, "ttt": {"params": "lora", "rank": LORA_RANK}}}}
    other = {**spec, "arms": {**spec["arms"], "b": {"codec": {"uniform": {"bits": 4}}, "ttt": {"params": "lora", "rank": LORA_RANK + 1}}}}
    h = [ids.spec_hash(ids.normalise_spec(s)[1]) for s in (spec, written, other)]
    assert h[0] == h[1] != h[2]
