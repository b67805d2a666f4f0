"""PV-Tuning (quant/pv_tuning.py): the V-step re-encodes exactly the top-τ code groups, each with the
answer an independent search gives for its buffer (rounding, brute-force nearest E8P point, brute-force
AQLM code pair); the trust ratio bounds the change; P-steps leave codes alone; the stored pack decodes to
the tuned model's weights; the loss goes down; bad options are refused naming the field. Seconds."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from quantatlas.errors import UserError
from quantatlas.quant.config import build
from quantatlas.quant.incoherence import decode
from quantatlas.quant.pv_tuning import PVMatrix, codec_of_pack
from quantatlas.quant.quantize import quantize_model
from quantatlas.quant.recipe import build_recipe
from quantatlas.quant.recovery import Recovery, RecoveryConfig
from quantatlas.spec import SpecError, parse_spec

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
SMALL = {"samples": 4, "seq_len": 32, "batch": 2, "steps": 6}
INT2 = {"uniform": {"bits": 2, "group": 32}}
E8P2 = {"e8p": {"bits": 2, "group": 32}}
AQLM = {"aqlm": {"codebooks": 2, "code_bits": 2, "group": 4, "codebook_bits": 8, "iters": 5}}


def _matrix(codec_spec, beam=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    codec = build("codec", codec_spec)
    packed = codec.encode(torch.randn(16, 64, generator=g))
    m = PVMatrix(packed, beam)
    with torch.no_grad():  # a buffer that has moved away from the decoded weights, by different amounts
        m.buffer += 0.5 * torch.randn(m.buffer.shape, generator=g) * torch.rand(m.buffer.shape, generator=g)
    return codec, packed, m


def _top_tau(m: PVMatrix, tau: float) -> torch.Tensor:
    """The groups of largest ‖B − W‖², computed here from the definition: a [rows, groups] mask."""
    w = m.groups.weight().detach()
    d = m.groups.d
    delta = ((m.buffer.detach() - w) ** 2).reshape(w.shape[0], -1, d).sum(-1)
    k = math.ceil(tau * delta.numel())
    kth = delta.reshape(-1).sort(descending=True).values
    assert kth[k - 1] > kth[k]  # no tie at the cut
    return delta >= kth[k - 1]


def _uniform_answer(m, codec, sel):
    """round(B / s) on the symmetric grid, clamped: the scalar grid's nearest level (stored as q − lo)."""
    lo, hi = codec.levels()
    s = m.groups.scale.detach().repeat_interleave(32, 1)
    q = torch.clamp(torch.round(m.buffer.detach() / s), lo, hi) - lo
    return q[sel].long()


def _e8p_points():
    from quantatlas.quant.codecs.e8p import e8p_decode

    return e8p_decode(torch.arange(1 << 16))   # all 65536 points


@pytest.mark.parametrize("codec_spec", [INT2, E8P2, AQLM])
def test_v_step_reencodes_exactly_the_top_tau_groups_with_the_codecs_answer(codec_spec):
    tau = 0.1
    codec, packed, m = _matrix(codec_spec, beam=4)   # aqlm: beam 4 = K^(M-1), an exhaustive first sweep
    sel = _top_tau(m, tau)
    before = m.groups.codes.clone()
    buffer = m.buffer.detach().clone()
    m.v_step(tau)
    after = m.groups.codes
    assert torch.equal(after[~sel], before[~sel])                     # the others keep their codes
    assert (after[sel] != before[sel]).any()                          # something moved
    rows, cols = packed.shape
    d = m.groups.d
    if "uniform" in codec_spec:
        assert torch.equal(after[sel][:, 0], _uniform_answer(m, codec, sel))
    elif "e8p" in codec_spec:
        # brute force over every E8P point: the nearest to B/σ of each re-encoded 8-vector
        s = m.groups.scale.detach().repeat_interleave(32 // 8, 1)      # σ per 8-vector
        t = (buffer.reshape(rows, -1, 8) / s[..., None])[sel]
        pts = _e8p_points()
        best = pts[torch.cdist(t.double(), pts.double()).argmin(1)]
        w = m.groups.weight().detach().reshape(rows, -1, 8)
        assert torch.allclose(w[sel], best * s[sel][:, None], atol=0, rtol=0)
    else:
        # brute force over all K^M code tuples of the stored codebooks: the least squared error to B/s
        C = m.groups.codebooks.detach()                                # [M, K, g], as stored
        s = m.groups.scale.detach()
        t = (buffer / s[:, None]).reshape(rows, -1, d)[sel]
        sums = (C[0][:, None, :] + C[1][None, :, :]).reshape(-1, d)    # tuple (a, b) -> a·K + b
        err = ((t[:, None, :] - sums[None]) ** 2).sum(-1)
        got = after[sel]
        mine = err.gather(1, (got[:, 0] * C.shape[1] + got[:, 1])[:, None])[:, 0]
        assert torch.allclose(mine, err.min(1).values, rtol=1e-6, atol=1e-7)


def test_trust_ratio_bounds_the_change_and_keeps_the_largest_first():
    codec, packed, m = _matrix(INT2)
    w0 = m.groups.weight().detach().clone()
    free = copy.deepcopy(m)
    free.v_step(0.2)
    m.v_step(0.2, trust_ratio=0.05)
    dw = m.groups.weight().detach() - w0
    changed = int((m.groups.codes != free.groups.codes).sum())
    assert changed > 0                                       # the bound cut some changes
    assert float(dw.norm()) <= 0.05 * float(w0.norm()) or int((dw != 0).sum()) == 1
    # whatever changed is among what the unbounded V-step changed, to the same code
    moved = (dw != 0).reshape(m.groups.codes.shape)
    assert torch.equal(m.groups.codes[moved], free.groups.codes[moved])


def test_a_larger_tau_reencodes_more_and_tau_one_is_the_full_reencode():
    codec, packed, m = _matrix(INT2)
    full = copy.deepcopy(m)
    full.v_step(1.0)
    lo, _ = codec.levels()
    s = full.groups.scale.detach().repeat_interleave(32, 1)
    want = torch.clamp(torch.round(full.buffer.detach() / s), lo, -lo - 1) - lo
    assert torch.equal(full.groups.codes[..., 0], want.long())


def _tuned(tiny_reference, codec, recovery, solver_options=None, seed=0, quantized=None):
    """(model, packed, new packs, info, Recovery) of the tiny model tuned; `quantized`: (model, packed) of
    an earlier quantize of the same codec, copied instead of quantizing again."""
    spec = parse_spec({"title": "t", "arms": {"a": {"codec": codec, "solver_options": solver_options or {},
                                                    "recovery": {**SMALL, **recovery}}}})
    fp = tiny_reference.model
    if quantized is None:
        model = copy.deepcopy(fp)
        packed = quantize_model(model, build_recipe(spec.arms["a"]), None, seed)
    else:
        model, packed = copy.deepcopy(quantized[0]), quantized[1]
    rec = Recovery(spec.arms["a"].recovery, seed)
    new, info = rec.run(model, fp, packed, WINDOWS)
    return model, packed, new, info, rec


def test_p_steps_leave_the_codes_unchanged(tiny_reference):
    # discrete_every past the last step: P-steps (and buffer updates) only
    _, packed, new, info, rec = _tuned(tiny_reference, INT2, {"method": "pv_tuning", "lr": 0.01, "discrete_every": 100})
    for name, m in rec.tuned.items():
        assert torch.equal(m.groups.codes, m.start), name
        assert torch.equal(new[name].data["codes"], packed[name].data["codes"]), name
    assert any(not torch.equal(new[n].data["scale"], packed[n].data["scale"]) for n in new)   # θ did train
    assert info["recovery_v_steps"] == 0 and info["recovery_codes_moved"] == 0


@pytest.mark.parametrize("codec, recovery, solver_options", [
    (INT2, {"method": "pv_tuning", "lr": 0.01, "discrete_every": 2, "fraction": 0.05, "v_lr": 0.1}, None),
    (E8P2, {"method": "pv_tuning", "lr": 0.01, "discrete_every": 2, "fraction": 0.05, "v_lr": 0.1,
            "train": "scales_norms"},
     {"incoherence": True}),
    ({"aqlm": {"codebooks": 2, "code_bits": 4, "group": 8, "iters": 3}},
     {"method": "pv_tuning", "lr": 0.01, "discrete_every": 3, "fraction": 0.05, "v_lr": 0.1, "beam": 2,
      "trust_ratio": 0.2}, None),
])
def test_stored_pack_decodes_to_the_tuned_models_weights(tiny_reference, codec, recovery, solver_options):
    model, packed, new, info, rec = _tuned(tiny_reference, codec, recovery, solver_options)
    params = dict(model.named_parameters())
    assert set(new) == set(packed)
    for name, p in new.items():
        old = packed[name]
        assert (p.codec, p.shape, sorted(p.data)) == (old.codec, old.shape, sorted(old.data))
        for k in p.data:   # the same tensors: the stored bits do not change
            assert (p.data[k].dtype, p.data[k].shape) == (old.data[k].dtype, old.data[k].shape), (name, k)
        assert p.bits_per_weight == old.bits_per_weight
        assert torch.equal(decode(codec_of_pack(p), p), params[name].detach()), name     # what is evaluated
        assert torch.equal(p.decode(), params[name].detach()), name                       # read on its own
    assert info["recovery_v_steps"] == 6 // recovery["discrete_every"]
    assert 0 < info["recovery_codes_moved"] <= info["recovery_code_changes"]


AQLM_TUNE = {"aqlm": {"codebooks": 2, "code_bits": 2, "group": 8, "codebook_bits": 8, "iters": 1}}


def test_p_only_with_frozen_codebooks_is_kd_ste_on_the_scales(tiny_reference):
    # P-steps alone with codebook_lr 0 train exactly kd_ste's parameters (the row scales, as s0·m) at the
    # same lr on the same batches; the only difference is pv_tuning's fp16 rounding of the scale in the loop
    common = {"lr": 0.01, "steps": 4}
    fp = tiny_reference.model
    quantized = copy.deepcopy(fp)
    quantized = quantized, quantize_model(quantized, build_recipe(parse_spec({"title": "t", "arms": {"a": {
        "codec": AQLM_TUNE}}}).arms["a"]), None, 0)
    _, packed, new_kd, info_kd, _ = _tuned(tiny_reference, AQLM_TUNE, {"method": "kd_ste", **common},
                                           quantized=quantized)
    _, _, new_pv, info_pv, _ = _tuned(tiny_reference, AQLM_TUNE, {"method": "pv_tuning", **common,
                                                                  "discrete_every": 100, "codebook_lr": 0},
                                      quantized=quantized)
    for name in packed:
        for k in ("codes", "codebook", "codebook_scale"):
            assert torch.equal(new_pv[name].data[k], packed[name].data[k]), (name, k)   # only the scales moved
        s_kd, s_pv = new_kd[name].data["scale"].float(), new_pv[name].data["scale"].float()
        assert not torch.equal(s_pv, packed[name].data["scale"].float()), name
        assert torch.allclose(s_pv, s_kd, rtol=2e-3, atol=0), name                       # a couple of fp16 ulps
    assert info_pv["recovery_train_kl_after"] == pytest.approx(info_kd["recovery_train_kl_after"], rel=1e-3)


def test_codebook_lr_is_the_codebooks_step_and_lr_the_scales(tiny_reference):
    # Adam's first step moves every parameter by lr·g/(|g| + eps), i.e. by (almost exactly) its lr
    from quantatlas.quant.codecs.gptvq import load_codebook

    _, packed, _, _, rec = _tuned(tiny_reference, AQLM_TUNE, {"method": "pv_tuning", "lr": 0.01, "steps": 1,
                                                              "codebook_lr": 1e-3, "discrete_every": 100})
    for name, m in rec.tuned.items():
        c0 = load_codebook(packed[name].data["codebook"], packed[name].data["codebook_scale"]).float()
        dc = (m.groups.books.detach() - c0).abs().max()
        dm = (m.groups.mult.detach() - 1).abs().max()
        assert 0.99e-3 <= float(dc) <= 1e-3 + 1e-6, name     # float32 rounding of entries of size ~1
        assert 0.99e-2 <= float(dm) <= 1e-2 + 1e-6, name


def test_pv_tuning_lowers_the_training_kl(tiny_reference):
    _, _, _, info, _ = _tuned(tiny_reference, INT2, {"method": "pv_tuning", "lr": 0.01, "steps": 10,
                                                     "discrete_every": 2, "fraction": 0.02, "v_lr": 0.05})
    assert info["recovery_train_kl_after"] < 0.9 * info["recovery_train_kl_before"]
    assert info["recovery_tokens"] == 10 * 2 * 32


def test_the_seed_fixes_the_result(tiny_reference):
    rec = {"method": "pv_tuning", "lr": 0.01, "discrete_every": 2, "fraction": 0.05}
    a, *_ = _tuned(tiny_reference, INT2, rec, seed=2)
    b, *_ = _tuned(tiny_reference, INT2, rec, seed=2)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("recovery, field, why", [
    ({"method": "pv_tuning", "train": "weights"}, "arms.a.recovery", "pv_tuning needs train: scales"),
    ({"method": "kd_ste", "beam": 4}, "arms.a.recovery", "beam is an option of method pv_tuning"),
    ({"method": "kd_ste", "trust_ratio": 0.1}, "arms.a.recovery", "trust_ratio is an option"),
    ({"method": "kd_ste", "codebook_lr": 1e-3}, "arms.a.recovery", "codebook_lr is an option"),
    ({"method": "pv_tuning", "codebook_lr": -1e-3}, "arms.a.recovery.codebook_lr", ""),
    ({"method": "pv_tuning", "trust_ratio": 0}, "arms.a.recovery.trust_ratio", ""),
    ({"method": "pv_tuning", "v_lr": 2.0}, "arms.a.recovery.v_lr", ""),
    ({"method": "pv_tuning", "beam": 0}, "arms.a.recovery.beam", ""),
    ({"method": "pv_tuning", "fraction": 0}, "arms.a.recovery.fraction", ""),
])
def test_bad_options_are_refused_naming_the_field(recovery, field, why):
    with pytest.raises(SpecError, match=field.replace(".", "\\.") + ".*" + why) as e:
        parse_spec({"title": "t", "arms": {"a": {"codec": INT2, "recovery": recovery}}})
    assert isinstance(e.value, UserError)


def test_a_codec_without_a_reencodable_code_is_a_clear_error(tiny_reference):
    from quantatlas.measure import quantize_arm

    arm = {"codec": {"turbo": {"bits": 3, "group": 32}}, "recovery": {"method": "pv_tuning", **SMALL}}
    with pytest.raises(SpecError, match="pv_tuning moves the codes of uniform, e8p, d4, e8, aqlm; codec is turbo"):
        parse_spec({"title": "t", "arms": {"a": arm}})                   # by its name, with the spec
    spec = parse_spec({"title": "t", "data": {"eval": {"tokens": 1024, "ctx": 128}},     # by its pack, in the run
                       "arms": {"a": {"codec": {"e8p": {"bits": 4, "group": 32}},
                                      "recovery": {"method": "pv_tuning", **SMALL}}}})
    with pytest.raises(UserError, match=r"^arms\.a\.recovery\.method: pv_tuning"):
        quantize_arm(tiny_reference, spec, "a", 0)


def test_new_options_leave_stored_configs_and_ids_as_they_were():
    from quantatlas.atlas import ids

    dumped = RecoveryConfig(method="kd_ste").model_dump()
    assert not {"v_lr", "trust_ratio", "beam", "codebook_lr"} & set(dumped)            # at their defaults: not written
    assert RecoveryConfig(method="pv_tuning", beam=4).model_dump()["beam"] == 4
    spec = {"title": "t", "data": {"eval": {"tokens": 4096}},
            "arms": {"a": {"codec": INT2, "recovery": {"method": "pv_lite", "fraction": 0.001}}}}
    explicit = copy.deepcopy(spec)
    explicit["arms"]["a"]["recovery"]["v_lr"] = 1e-2                    # the default, written out
    explicit["arms"]["a"]["recovery"]["codebook_lr"] = None
    same = [ids.experiment_id(ids.spec_hash(ids.normalise_spec(s)[1])) for s in (spec, explicit)]
    assert same[0] == same[1]
