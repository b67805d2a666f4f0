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
             "codec": {"uniform": {"bits": 4, "scale": "absmax"}}}   # absmax: uniform's first grid
    now = {"solver": solver, "solver_options": {"act_order": True, "static_groups": True}, "codec": codec}
    assert exp_id(first) == FIRST_BARE_ID[solver]          # the old computation keeps its id
    assert exp_id(bare) != FIRST_BARE_ID[solver]           # the bare spelling now does something else
    assert exp_id(bare) == exp_id(now)                     # ... and is the explicit spelling of it
    # what the id records: the options that differ from their first defaults
    assert parse_spec(spec_of(bare)).identity()["arms"]["a"]["solver_options"] == \
        {"act_order": True, "static_groups": True}
    assert "solver_options" not in parse_spec(spec_of(first)).identity()["arms"]["a"]
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
