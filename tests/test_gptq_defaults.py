"""GPTQ's defaults as chosen by the sweep of experiments/gptq/defaults_int{4,3,2}.yaml (issue 25): act_order
and static_groups on, for gptq and gptaq. Both were first released off and declare it (`first_default`), so
the bare spelling gets a new experiment id, the old explicit spelling keeps the old one, and the sweep's
own arms (every option spelled out) and `make run`'s baselines keep theirs. The ids below were computed
before the defaults changed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quantatlas.atlas import ids
from quantatlas.quant.codecs import make_codec
from quantatlas.quant.config import identity_default, parse_config
from quantatlas.quant.solvers.gptq import GPTAQConfig, GPTQConfig, gptq
from quantatlas.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]

#: experiment ids of {"title": "t", "arms": {"a": {"solver": S, "codec": {"uniform": {"bits": 4}}}}}
#: under the first defaults (act_order and static_groups off)
FIRST_BARE_ID = {"gptq": "cexp_92c365fe", "gptaq": "cexp_7857832b"}
#: spec hashes of `make run`'s spec and of the sweep's specs, before the defaults changed
BASELINES_HASH = "6b7cc75294a32d38"
SWEEP_HASHES = {4: "7597c2dde5f92bd6", 3: "9805b2466c371110", 2: "13498ec40c8965a3"}

pytestmark = pytest.mark.usefixtures("one_thread")


def spec_of(arm: dict) -> dict:
    return {"title": "t", "arms": {"a": arm}}


def exp_id(arm: dict) -> str:
    return ids.experiment_id(ids.spec_hash(ids.normalise_spec(spec_of(arm))[1]))


@pytest.mark.parametrize("cls", [GPTQConfig, GPTAQConfig])
def test_act_order_and_static_groups_are_on_and_were_first_released_off(cls):
    cfg = cls()
    assert cfg.act_order is True and cfg.static_groups is True
    for name in ("act_order", "static_groups"):
        assert identity_default(cls.model_fields[name]) is False
    # the other options keep their first defaults (measured against them as before)
    assert (cfg.block_size, cfg.damp, cfg.importance_from_hessian, cfg.incoherence) == (128, 0.01, True, False)


@pytest.mark.parametrize("solver", ["gptq", "gptaq"])
def test_the_bare_spelling_gets_a_new_id_and_the_old_explicit_one_keeps_the_old_id(solver):
    codec = {"uniform": {"bits": 4}}
    bare = {"solver": solver, "codec": codec}
    first = {"solver": solver, "solver_options": {"act_order": False, "static_groups": False},
             "propagation": "sequential",                          # the first propagation
             "codec": {"uniform": {"bits": 4, "scale": "absmax"}}}   # absmax: uniform's first grid
    now = {"solver": solver, "solver_options": {"act_order": True, "static_groups": True}, "propagation": "layer",
           "codec": {"uniform": {"bits": 4, "scale": "signed_max"}}}
    assert exp_id(first) == FIRST_BARE_ID[solver]          # the old computation keeps its id
    assert exp_id(bare) != FIRST_BARE_ID[solver]           # the bare spelling now does something else
    assert exp_id(bare) == exp_id(now)                     # ... and is the explicit spelling of it
    # what the id records: the options that differ from their first defaults
    assert parse_spec(spec_of(bare)).identity()["arms"]["a"]["solver_options"] == \
        {"act_order": True, "static_groups": True}
    assert parse_spec(spec_of(bare)).identity()["arms"]["a"]["propagation"] == "layer"
    assert "solver_options" not in parse_spec(spec_of(first)).identity()["arms"]["a"]
    assert "propagation" not in parse_spec(spec_of(first)).identity()["arms"]["a"]
    # half the change is its own computation: static groups in column order
    only_static = {"solver": solver, "solver_options": {"act_order": False}, "codec": codec}
    assert exp_id(only_static) not in (exp_id(bare), FIRST_BARE_ID[solver])
    assert exp_id(only_static) == exp_id({**only_static, "solver_options": {"act_order": False,
                                                                              "static_groups": True}})


def test_stored_runs_are_matched_by_the_computation():
    """The ledger and the JSON resume match stored runs by the arm's full dump: the bare spelling's now
    says act_order/static_groups on, the old explicit spelling's says what every stored run says."""
    def options(arm):
        return parse_spec(spec_of(arm)).arms["a"].model_dump(mode="json")["solver_options"]

    first = {"block_size": 128, "damp": 0.01, "act_order": False, "static_groups": False,
             "importance_from_hessian": True, "incoherence": False}
    assert options({"solver": "gptq", "solver_options": {"act_order": False, "static_groups": False},
                    "codec": {"uniform": {"bits": 4}}}) == first
    assert options({"solver": "gptq", "codec": {"uniform": {"bits": 4}}}) == \
        dict(first, act_order=True, static_groups=True)


def test_the_bare_solver_runs_act_order_with_static_groups():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 128, generator=g, dtype=torch.float64)
    X = torch.randn(128, 512, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 128,
                                                                                 dtype=torch.float64)[:, None]
    H = 2 * X @ X.T / X.shape[1]
    codec = make_codec("uniform", {"bits": 3, "group": 32})
    w_bare, _ = parse_config("solver", "gptq").build().solve(W.clone(), {"hessian": H.clone()}, codec)
    w_ao = gptq(W, H, codec, act_order=True, static_groups=True)[0]
    w_first = gptq(W, H, codec)[0]
    assert torch.equal(w_bare, w_ao)
    assert not torch.equal(w_bare, w_first)
    # act order at work: columns by descending diag(H) give a lower proxy loss here
    loss = lambda w_hat: float(torch.trace((w_hat.double() - W) @ H @ (w_hat.double() - W).T))  # noqa: E731
    assert loss(w_ao) < loss(w_first)


def test_act_order_without_static_groups_is_still_refused_by_name():
    with pytest.raises(SpecError) as e:
        parse_spec(spec_of({"solver": "gptq", "solver_options": {"static_groups": False},
                            "codec": {"uniform": {"bits": 4, "group": 128}}}))
    assert e.value.field == "arms.a.solver_options.act_order" and "needs static_groups: true" in str(e.value)
    # per-row scales need no static groups
    parse_spec(spec_of({"solver": "gptq", "solver_options": {"static_groups": False},
                        "codec": {"uniform": {"bits": 4, "group": None}}}))


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_the_sweep_specs_keep_their_ids(bits):
    """Every arm of the sweep spells out what it measures, so its results keep their meaning and id."""
    spec = load_spec(ROOT / "experiments" / "gptq" / f"defaults_int{bits}.yaml")
    assert spec.spec_hash() == SWEEP_HASHES[bits]
    first = spec.arms["first_default"]
    assert (first.solver_options.act_order, first.solver_options.static_groups) == (False, False)
    assert (first.codec.clip, first.codec.scale, first.propagation) == ("minmax", "absmax", "sequential")


def test_make_runs_baselines_keep_their_id_and_their_grid():
    spec = load_spec(ROOT / "experiments" / "baselines.yaml")
    assert spec.spec_hash() == BASELINES_HASH
    # the RTN arms are the absmax / (2^(b-1) - 1) grid, checked against a direct computation
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(4, 256, generator=g) * 0.05).half().float()
    from quantatlas.quant.solvers.rtn import rtn

    for name, bits in (("int4_g128", 4), ("int3_g128", 3)):
        codec = spec.arms[name].codec.build()
        w_hat = rtn(W, codec)[0].numpy()
        n = 2 ** (bits - 1)
        w = W.numpy().reshape(4, 2, 128)
        s = (np.abs(w).max(-1, keepdims=True) / np.float32(n - 1)).astype(np.float16).astype(np.float32)
        want = np.clip(np.rint(w / s), -n, n - 1) * s
        np.testing.assert_array_equal(w_hat, want.reshape(4, 256))


# ---- uniform's grid: signed_max by default, absmax its first default -------------------------------

#: experiment ids of {"title": "t", "arms": {"a": {"codec": {"uniform": OPTIONS}}}} before the change
FIRST_RTN_ID = "cexp_3b37bc2c"           # {bits: 4}
FIRST_ASYMMETRIC_ID = "cexp_558329dd"    # {bits: 4, symmetric: false}


def test_uniforms_scale_is_signed_max_and_was_first_released_absmax():
    from quantatlas.quant.codecs.uniform import UniformConfig

    bare = parse_config("codec", {"uniform": {"bits": 4}})
    first = parse_config("codec", {"uniform": {"bits": 4, "scale": "absmax"}})
    assert bare.scale == "signed_max" and identity_default(UniformConfig.model_fields["scale"]) == "absmax"
    # stored configs write the scale out either way, so no reader depends on its own default
    stored_before = {"bits": 4, "group": 128, "symmetric": True, "clip": "minmax"}   # before the option existed
    assert first.options() == dict(stored_before, scale="absmax")
    assert bare.options() == dict(stored_before, scale="signed_max")
    assert first.options(True) == {"bits": 4} and bare.options(True) == {"bits": 4, "scale": "signed_max"}
    assert exp_id({"codec": {"uniform": {"bits": 4, "scale": "absmax"}}}) == FIRST_RTN_ID
    assert exp_id({"codec": {"uniform": {"bits": 4}}}) != FIRST_RTN_ID
    assert exp_id({"codec": {"uniform": {"bits": 4}}}) == \
        exp_id({"codec": {"uniform": {"bits": 4, "scale": "signed_max"}}})
    # an asymmetric grid fits min and max, as it always did: same config, same id
    asym = parse_config("codec", {"uniform": {"bits": 4, "symmetric": False}})
    assert asym.scale == "absmax" and "scale" not in asym.options(True)
    assert exp_id({"codec": {"uniform": {"bits": 4, "symmetric": False}}}) == FIRST_ASYMMETRIC_ID


def test_configs_stored_before_the_scale_existed_read_as_absmax_and_keep_their_keys():
    """A ledger's or a pushed record's config without `scale` was stored before the option existed and ran
    absmax; a config stored now writes it out; both key stored results the same (runner.arm_key)."""
    from quantatlas.runner import arm_key
    from quantatlas.spec import arm_of, parse_stored_spec, stable_arm_config

    old = {"solver": "rtn", "codec": {"uniform": {"bits": 4, "group": 128, "symmetric": True, "clip": "minmax"}},
           "overrides": [{"match": "down", "codec": {"uniform": {"bits": 8, "group": None, "symmetric": True,
                                                                  "clip": "minmax"}}}]}
    arm = arm_of(old)
    assert arm.codec.scale == "absmax" and arm.overrides[0].codec.scale == "absmax"
    now = parse_spec(spec_of({"codec": {"uniform": {"bits": 4, "scale": "absmax"}},
                              "overrides": [{"match": "down", "codec": {"uniform": {"bits": 8, "group": None,
                                                                                    "scale": "absmax"}}}]}))
    dumped = now.arms["a"].model_dump(mode="json")
    assert dumped["codec"]["uniform"]["scale"] == "absmax"
    assert arm_key(dumped, "m", "e") == arm_key(arm.model_dump(mode="json"), "m", "e")
    assert stable_arm_config(dumped)["codec"] == old["codec"]
    # a whole stored spec, and a spec stored now, read back as what they ran
    assert parse_stored_spec(spec_of(old)).arms["a"].codec.scale == "absmax"
    assert parse_stored_spec(now.to_dict()).spec_hash() == now.spec_hash()
    assert parse_spec(now.to_dict()).spec_hash() == now.spec_hash()
    # the bare spelling is signed_max, stored and read back as signed_max
    bare = parse_spec(spec_of({"codec": {"uniform": {"bits": 4}}}))
    assert parse_stored_spec(bare.to_dict()).arms["a"].codec.scale == "signed_max"


def test_the_bare_uniform_grid_is_autorounds_signed_max():
    """RTN with {uniform: {bits: b}} against a direct computation: s = fp16(-w_max / 2^(b-1)) per group of 128,
    w_max the weight of largest magnitude with its sign (the positive one on a tie), q = clamp(round(w / s))."""
    from quantatlas.quant.solvers.rtn import rtn

    g = torch.Generator().manual_seed(2)
    W = (torch.randn(5, 256, generator=g) * 0.05).half().float()
    W[0, :128] = -W[0, :128].abs()                      # a group whose largest weight is negative
    for bits in (4, 3, 2):
        w_hat = rtn(W, parse_config("codec", {"uniform": {"bits": bits}}).build())[0].numpy()
        n = 2 ** (bits - 1)
        w = W.numpy().reshape(5, 2, 128)
        top, bottom = np.maximum(w.max(-1), 0), np.minimum(w.min(-1), 0)
        largest = np.where(top >= -bottom, top, bottom)[..., None]
        s = (-largest / np.float32(n)).astype(np.float16).astype(np.float32)
        want = np.clip(np.rint(w / s), -n, n - 1) * s
        np.testing.assert_array_equal(w_hat, want.reshape(5, 256))


def test_the_bare_gptq_arm_is_the_swept_default():
    arm = parse_spec(spec_of({"solver": "gptq", "codec": {"uniform": {"bits": 4}}})).arms["a"]
    chosen = load_spec(ROOT / "experiments" / "gptq" / "defaults_propagation_int4.yaml").arms["layer"]
    assert arm.solver_options == chosen.solver_options and arm.codec == chosen.codec
    assert arm.propagation == chosen.propagation


@pytest.mark.parametrize("scheme", ["W8A8", "W4A8", "INT8", "W4A4"])
def test_activation_presets_keep_their_first_grid(scheme):
    """A preset's id is its name: its grid must not follow uniform's default (absmax / (2^(b-1) - 1) per token)."""
    from quantatlas.quant.act import ActConfig

    assert ActConfig.model_validate(scheme).codec_config().scale == "absmax"


#: the experiment id of {"solver": "gptq", "solver_options": {"act_order": false, "static_groups": false},
#: "codec": {"e8p": {"bits": 2}}} before propagation's default changed (the first defaults' e8p arm)
FIRST_E8P_ID = "cexp_4112aae9"


@pytest.mark.parametrize("codec", [{"e8p": {"bits": 2}}, {"d4": {"bits": 2}}, {"e8": {"bits": 2}},
                                   {"nestquant": {"bits": 3}}, {"turbo": {"bits": 3}}])
def test_lattice_codecs_run_gptq_in_column_order_unless_the_arm_says(codec):
    """act_order + static_groups raise the lattices' KLD (defaults_codecs.yaml, defaults_e8p2.yaml): where an arm
    writes neither, they run off, as first released, and the id records nothing about them."""
    arm = parse_spec(spec_of({"solver": "gptq", "codec": codec})).arms["a"]
    assert (arm.solver_options.act_order, arm.solver_options.static_groups) == (False, False)
    assert "solver_options" not in parse_spec(spec_of({"solver": "gptq", "codec": codec})).identity()["arms"]["a"]
    # written, they are what the arm says
    ao = parse_spec(spec_of({"solver": "gptq", "solver_options": {"act_order": True}, "codec": codec})).arms["a"]
    assert (ao.solver_options.act_order, ao.solver_options.static_groups) == (True, True)
    # scalar grids keep the swept defaults
    lm = parse_spec(spec_of({"solver": "gptq", "codec": {"lloyd_max": {"bits": 3}}})).arms["a"]
    assert (lm.solver_options.act_order, lm.solver_options.static_groups) == (True, True)


def test_the_first_e8p_arm_keeps_its_id_when_it_writes_its_propagation():
    assert exp_id({"solver": "gptq", "propagation": "sequential", "codec": {"e8p": {"bits": 2}}}) == FIRST_E8P_ID
    assert exp_id({"solver": "gptq", "codec": {"e8p": {"bits": 2}}}) != FIRST_E8P_ID     # layer propagation now


def test_propagation_is_layer_for_solvers_that_propagate_and_first_default_for_rtn():
    assert parse_spec(spec_of({"solver": "gptq", "codec": {"uniform": {"bits": 4}}})).arms["a"].propagation == "layer"
    rtn = parse_spec(spec_of({"codec": {"uniform": {"bits": 4}}}))
    assert rtn.arms["a"].propagation == "sequential" and "propagation" not in rtn.identity()["arms"]["a"]
    mixed = parse_spec(spec_of({"codec": {"uniform": {"bits": 4}},
                                "overrides": [{"match": "down", "solver": "gptq", "codec": {"uniform": {"bits": 4}}}]}))
    assert mixed.arms["a"].propagation == "layer"
    # the first propagation, written, is honoured
    assert parse_spec(spec_of({"solver": "gptq", "propagation": "sequential",
                               "codec": {"uniform": {"bits": 4}}})).arms["a"].propagation == "sequential"
