"""Finetune recovery (quant/recovery.py): the tuned model is still exactly the codec's format, the
loss goes down on the training tokens, training and eval tokens never overlap, PV-lite moves at most
its fraction of codes, and the seed fixes the data order. Tiny models and a few steps: seconds."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from quantatlas.quant.incoherence import IncoherentPacked, decode
from quantatlas.quant.pv_tuning import codec_of_pack
from quantatlas.quant.quantize import quantize_model
from quantatlas.quant.recipe import build_recipe
from quantatlas.quant.recovery import Recovery, RecoveryConfig, batch_order, check_disjoint
from quantatlas.spec import SpecError, parse_spec

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
SMALL = {"samples": 4, "seq_len": 32, "batch": 2, "steps": 6}


def _tuned(tiny_reference, codec, recovery, solver_options=None, seed=0):
    spec = parse_spec({"title": "t", "arms": {"a": {"codec": codec, "solver_options": solver_options or {},
                                                    "recovery": {**SMALL, **recovery}}}})
    recipe = build_recipe(spec.arms["a"])
    fp = tiny_reference.model
    model = copy.deepcopy(fp)
    packed = quantize_model(model, recipe, None, seed)
    rec = Recovery(spec.arms["a"].recovery, seed)
    new, info = rec.run(model, fp, packed, WINDOWS)
    return model, packed, new, info, rec


def _assert_format_kept(model, packed, new, seed=0):
    params = dict(model.named_parameters())
    assert set(new) == set(packed)
    for name, p in new.items():
        old = packed[name]
        assert (p.codec, p.shape, sorted(p.data)) == (old.codec, old.shape, sorted(old.data))
        for k in p.data:  # same tensors, dtypes and shapes: the stored bits do not change
            assert (p.data[k].dtype, p.data[k].shape) == (old.data[k].dtype, old.data[k].shape), (name, k)
        assert p.bits_per_weight == old.bits_per_weight
        # the model evaluates exactly decode(Packed)
        assert torch.equal(decode(codec_of_pack(p), p), params[name].detach()), name


INT2 = {"uniform": {"bits": 2, "group": 32}}


@pytest.mark.parametrize("recovery, solver_options", [
    ({"method": "kd_ste", "lr": 0.01}, None),
    ({"method": "kd_ste", "train": "scales_norms", "lr": 0.01}, None),
    ({"method": "block_ap", "lr": 0.01}, None),
    ({"method": "block_ap", "train": "weights", "lr": 0.001}, None),
    ({"method": "pv_lite", "discrete_every": 3, "lr": 0.01}, None),
    ({"method": "kd_ste", "lr": 0.01}, {"incoherence": True}),
])
def test_format_kept_and_weights_are_decoded_packs(tiny_reference, recovery, solver_options):
    model, packed, new, _, _ = _tuned(tiny_reference, INT2, recovery, solver_options)
    _assert_format_kept(model, packed, new)
    if recovery.get("train") != "weights":  # something was actually tuned
        assert any(not torch.equal(new[n].data["scale"], packed[n].data["scale"]) for n in new)


def test_ste_weights_encode_of_latent_is_what_the_model_evaluates(tiny_reference):
    model, packed, new, _, rec = _tuned(tiny_reference, INT2, {"method": "kd_ste", "train": "weights", "lr": 1e-3})
    _assert_format_kept(model, packed, new)
    params = dict(model.named_parameters())
    for name, t in rec.tuned.items():
        codec = codec_of_pack(new[name])
        latent = t.latent.detach()
        assert torch.equal(codec.decode(codec.encode(latent)), params[name].detach())
        assert torch.equal(codec.fake_quantize(latent), params[name].detach())  # the forward STE used


def test_scales_compose_with_an_incoherence_e8p_pack(tiny_reference):
    model, packed, new, info, _ = _tuned(tiny_reference, {"e8p": {"bits": 2, "group": 32}},
                                         {"method": "kd_ste", "lr": 1e-3}, {"incoherence": True})
    _assert_format_kept(model, packed, new)
    assert all(isinstance(p, IncoherentPacked) and "incoherence_seed" in p.parts() for p in new.values())


def test_kd_ste_lowers_kl_on_training_tokens(tiny_reference):
    _, _, _, info, rec = _tuned(tiny_reference, INT2, {"method": "kd_ste", "lr": 0.01, "steps": 10})
    assert info["recovery_train_kl_after"] < 0.9 * info["recovery_train_kl_before"]
    assert info["recovery_cpu_s"] > 0 and info["recovery_tokens"] == 10 * 2 * 32


def test_ggml_formats_refuse_scales_with_a_clear_error(tiny_reference):
    with pytest.raises(ValueError, match="recovery.train: scales.*q4_0.*train: weights"):
        _tuned(tiny_reference, "q4_0", {"method": "kd_ste"})


def test_pv_lite_moves_at_most_its_fraction_of_codes(tiny_reference):
    fraction = 0.01
    model, packed, new, info, rec = _tuned(tiny_reference, INT2, {"method": "pv_lite", "fraction": fraction,
                                                                  "discrete_every": 6, "lr": 0.01})
    from quantatlas.quant.codecs.base import unpack_bits

    total_moved = 0
    for name, p in new.items():  # one discrete step: each matrix moves at most ⌊fraction·n⌋ codes, by ±1
        n = p.shape[0] * p.shape[1]
        a = unpack_bits(packed[name].data["codes"], 2, n)
        b = unpack_bits(p.data["codes"], 2, n)
        moved = int((a != b).sum())
        assert moved <= int(fraction * n)
        assert int((a - b).abs().max()) <= 1
        total_moved += moved
    assert total_moved > 0 or rec.rejected == 1  # a step that raised the batch loss is taken back
    assert info["recovery_codes_moved"] == pytest.approx(total_moved / sum(p.shape[0] * p.shape[1] for p in new.values()))


def test_seed_fixes_data_order_and_result(tiny_reference):
    cfg = RecoveryConfig(method="kd_ste", samples=16, batch=2, steps=20)
    assert batch_order(cfg, 0) == batch_order(cfg, 0)
    assert batch_order(cfg, 0) != batch_order(cfg, 1)
    assert sorted(batch_order(cfg, 0)[:8]) == list(range(8))  # an epoch visits every batch once
    a, *_ = _tuned(tiny_reference, INT2, {"method": "kd_ste", "lr": 0.01}, seed=3)
    b, *_ = _tuned(tiny_reference, INT2, {"method": "kd_ste", "lr": 0.01}, seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_disjointness_check():
    stream = np.arange(1000)
    check_disjoint(stream, np.array([600, 900]), 50, stream, 512)        # after the eval tokens: fine
    check_disjoint(stream, np.array([0, 10]), 50, np.arange(2000), 512)   # another stream (another split)
    with pytest.raises(ValueError, match="window at token 100 .*overlaps the eval tokens \\[0, 512\\)"):
        check_disjoint(stream, np.array([600, 100]), 50, stream.copy(), 512)


def test_runner_refuses_recovery_that_would_train_on_eval_tokens(tiny_reference, tmp_path):
    from quantatlas.runner import run_spec

    text = tmp_path / "corpus.txt"
    text.write_bytes(bytes(range(32, 127)) * 40)
    spec = {"title": "t", "data": {"calib": {"source": str(text)}, "eval": {"source": str(text), "tokens": 1024,
                                                                            "ctx": 64}},
            "arms": {"a": {"codec": INT2, "recovery": {"method": "kd_ste", **SMALL}}}}
    with pytest.raises(ValueError, match="overlaps the eval tokens"):
        run_spec(spec, ledger=False, loaded=tiny_reference, compress=False, log=lambda m: None)


def test_runner_end_to_end_records_cpu_time_and_keeps_bits(tiny_reference):
    from quantatlas.runner import run_spec

    spec = {"title": "t", "data": {"eval": {"tokens": 2048, "ctx": 128}}, "seeds": [0],
            "arms": {"none": {"codec": INT2},
                     "kd": {"codec": INT2, "recovery": {"method": "kd_ste", "lr": 0.01, **SMALL}}}}
    doc = run_spec(spec, ledger=False, loaded=tiny_reference, compress=False, log=lambda m: None)
    none, kd = doc["arms"]["none"]["seeds"]["0"], doc["arms"]["kd"]["seeds"]["0"]
    assert kd["bits_per_weight"] == none["bits_per_weight"] and kd["bytes_packed"] == none["bytes_packed"]
    assert kd["recovery_cpu_s"] > 0 and kd["kld_mean"] != none["kld_mean"]


@pytest.mark.parametrize("recovery, field", [
    ({"method": "sgd"}, "arms.a.recovery.method"),
    ({"method": "kd_ste", "steps": 0}, "arms.a.recovery.steps"),
    ({"method": "kd_ste", "train": "codes"}, "arms.a.recovery.train"),
    ({"method": "kd_ste", "fraction": 2.0}, "arms.a.recovery.fraction"),
    ({"method": "kd_ste", "epochs": 3}, "arms.a.recovery.epochs"),
    ({"method": "pv_lite", "train": "weights"}, "arms.a.recovery"),
])
def test_spec_errors_name_the_field(recovery, field):
    with pytest.raises(SpecError, match=field.replace(".", "\\.")):
        parse_spec({"title": "t", "arms": {"a": {"codec": INT2, "recovery": recovery}}})


def test_recovery_makes_an_arm_seeded():
    spec = parse_spec({"title": "t", "arms": {"a": {"codec": INT2, "recovery": {"method": "kd_ste"}},
                                              "b": {"codec": INT2}}})
    assert spec.arms["a"].seeded and not spec.arms["b"].seeded


def test_pv_lite_discrete_step_follows_the_gradient_and_undoes():
    from quantatlas.quant.codecs.base import unpack_bits
    from quantatlas.quant.config import build
    from quantatlas.quant.recovery import _UniformCodes

    codec = build("codec", {"uniform": {"bits": 3, "group": 16, "scale": "absmax"}})   # positive scales
    packed = codec.encode(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)))
    t = _UniformCodes(packed, codec, None)
    q0 = t.q.clone()
    t.grad = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    g = t.grad.clone()
    k = t.discrete_step(0.05)
    moved = t.q != q0
    assert k == int(moved.sum()) == int(0.05 * 256)
    d = (t.q - q0)[moved]
    assert torch.equal(d, -torch.sign(g[moved]))  # each move lowers the loss to first order (scales > 0)
    s = t.scale.detach().repeat_interleave(16, 1)
    gain = (g * s).abs()
    legal = ((q0 - torch.sign(g)) >= t.lo) & ((q0 - torch.sign(g)) <= t.hi)
    assert gain[moved].min() >= gain[legal & ~moved].max()  # the largest −g·Δ first
    codes = unpack_bits(t.finalize().data["codes"], 3, 256).reshape(8, 32).float() + t.lo
    assert torch.equal(codes, t.q)
    t.undo()
    assert torch.equal(t.q, q0) and not t.moved.any()


def test_recovery_counts_the_tokens_it_trained_on(tiny_reference):
    """A pool of 3 windows in batches of 2 has a short last batch: the count is of what went through."""
    spec = parse_spec({"title": "t", "arms": {"a": {"codec": INT2, "recovery": {
        "method": "kd_ste", "samples": 3, "seq_len": 32, "batch": 2, "steps": 5, "lr": 0.01}}}})
    recipe = build_recipe(spec.arms["a"])
    model = copy.deepcopy(tiny_reference.model)
    packed = quantize_model(model, recipe, None, 0)
    _, info = Recovery(spec.arms["a"].recovery, 0).run(model, tiny_reference.model, packed, WINDOWS[:3])
    sizes = [min(2, 3 - 2 * i) for i in batch_order(spec.arms["a"].recovery, 0)]
    assert info["recovery_tokens"] == 32 * sum(sizes) and 2 * 32 * 5 != 32 * sum(sizes)


def test_training_kl_is_the_harness_kld(tiny_reference):
    """Recovery's KL(P_fp ‖ P_q) over every position equals eval/kld.py's per-token KLD, averaged."""
    from quantatlas.eval.kld import token_metrics

    model, *_ = _tuned(tiny_reference, INT2, {"method": "kd_ste", "steps": 1})
    fp = tiny_reference.model
    with torch.no_grad():
        t = torch.log_softmax(fp(WINDOWS).logits.double(), -1).reshape(-1, fp.config.vocab_size)
        q = model(WINDOWS).logits.double().reshape(-1, fp.config.vocab_size)
    want = float(token_metrics(t, q, WINDOWS.reshape(-1)).kld.mean())
    assert Recovery(RecoveryConfig(method="kd_ste"), 0).kl(model, fp, WINDOWS) == pytest.approx(want, rel=1e-4)


def test_recovery_on_an_arm_without_quantized_matrices_is_a_clear_error(tiny_reference):
    with pytest.raises(SpecError, match="arms.a.recovery: recovery: kd_ste tunes quantized weights, and the arm "
                                        "quantizes none") as e:      # refused with the spec
        parse_spec({"title": "t", "arms": {"a": {"codec": None, "recovery": {"method": "kd_ste", **SMALL}}}})
    assert e.value.field == "arms.a.recovery"
    model = copy.deepcopy(tiny_reference.model)
    with pytest.raises(ValueError, match="nothing to tune"):     # and Recovery itself, called directly
        Recovery(RecoveryConfig(method="kd_ste", **SMALL), 0).run(model, tiny_reference.model, {}, WINDOWS)


def test_a_recovery_error_in_a_run_names_the_arm(tiny_reference):
    from quantatlas.measure import quantize_arm

    spec = parse_spec({"title": "t", "data": {"eval": {"tokens": 1024, "ctx": 128}},
                       "arms": {"good": {"codec": INT2}, "bad": {"codec": "q4_0", "recovery": {"method": "kd_ste", **SMALL}}}})
    with pytest.raises(ValueError, match=r"^arms\.bad\.recovery\.train: scales"):
        quantize_arm(tiny_reference, spec, "bad", 0)


def test_a_seeded_codec_recovers_at_any_seed(tiny_reference):
    """The codec rebuilt from a turbo pack already holds its run's seed: recovery at seed 1 re-packs with
    it (it used to derive the seed a second time and refuse the pack)."""
    from quantatlas.measure import quantize_arm

    spec = parse_spec({"title": "t", "seeds": [1], "data": {"eval": {"tokens": 1024, "ctx": 128}},
                       "arms": {"a": {"codec": {"turbo": {"bits": 3, "group": 32}},
                                      "recovery": {"method": "kd_ste", "train": "scales", **SMALL}}}})
    qm = quantize_arm(tiny_reference, spec, "a", 1)
    params = dict(qm.model.named_parameters())
    for name, p in qm.packed.items():
        assert torch.equal(p.decode(), params[name].detach()), name


def test_roste_on_an_arm_that_quantizes_no_weight_is_refused_with_the_spec():
    """Only the KV cache quantized: RoSTE used to stop mid-run with an AttributeError (no fp teacher is taken
    before a step that quantizes weights)."""
    arm = {"kv": {"k": "q8_0"}, "recovery": {"method": "roste", "steps": 2}}
    with pytest.raises(SpecError, match="recovery: roste tunes quantized weights, and the arm quantizes none") as e:
        parse_spec({"title": "t", "arms": {"a": arm}})
    assert e.value.field == "arms.a.recovery"
