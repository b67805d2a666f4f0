"""The identity rule for changed defaults: an experiment id measures every option against its first
released default, so a changed default never lets one id stand for two computations. A toy codec
is released, then re-released with a changed default, here."""
from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from quantatlas.atlas import ids
from quantatlas.quant.config import ADDED_LATER, FIRST_DEFAULT, CodecConfig, identity_dump, registry


def exp_id(codec) -> str:
    spec = {"title": "t", "data": {"eval": {"tokens": 4096}}, "arms": {"a": {"codec": codec}}}
    return ids.experiment_id(ids.spec_hash(ids.normalise_spec(spec)[1]))


@pytest.fixture
def release():
    """Defines a toy codec config `toy_release` (its class body given), unregistered afterwards."""
    def define(body: dict):
        return type("ToyRelease", (CodecConfig,), {"__module__": __name__, "name": "toy_release", **body})
    yield define
    registry("codec").pop("toy_release", None)


def test_a_changed_default_gives_the_bare_spelling_a_new_id_and_keeps_the_old_explicit_ones(release):
    from typing import Literal

    release({"__annotations__": {"rounding": Literal["nearest", "stochastic"], "bits": int},
             "rounding": "nearest", "bits": 4})
    v1_bare, v1_nearest, v1_stochastic = exp_id("toy_release"), exp_id({"toy_release": {"rounding": "nearest"}}), \
        exp_id({"toy_release": {"rounding": "stochastic"}})
    assert v1_bare == v1_nearest != v1_stochastic

    # the second release changes the default and declares the first one
    release({"__annotations__": {"rounding": Literal["nearest", "stochastic"], "bits": int},
             "rounding": Field("stochastic", json_schema_extra={FIRST_DEFAULT: "nearest"}), "bits": 4})
    assert exp_id("toy_release") != v1_bare                       # the bare spelling now does something else
    assert exp_id("toy_release") == v1_stochastic                  # ... what the old explicit spelling did
    assert exp_id({"toy_release": {"rounding": "nearest"}}) == v1_bare   # the old computation keeps its id
    assert exp_id({"toy_release": {"rounding": "stochastic"}}) == v1_stochastic
    assert exp_id({"toy_release": {"bits": 3}}) != exp_id({"toy_release": {"bits": 3, "rounding": "nearest"}})

    # without the declaration the new default would take the old id: the failure the rule prevents
    release({"__annotations__": {"rounding": Literal["nearest", "stochastic"], "bits": int},
             "rounding": "stochastic", "bits": 4})
    assert exp_id("toy_release") == v1_bare


def test_an_option_added_later_changes_no_stored_config_at_its_first_default(release):
    v1 = release({"__annotations__": {"bits": int}, "bits": 4})
    before = v1(bits=4).options(), v1(bits=4).options(True), exp_id("toy_release")
    v2 = release({"__annotations__": {"bits": int, "scale": str}, "bits": 4,
                  "scale": Field("absmax", json_schema_extra={ADDED_LATER: True})})
    assert (v2(bits=4).options(), v2(bits=4).options(True), exp_id("toy_release")) == before
    assert v2(bits=4, scale="absmax").options() == {"bits": 4}
    assert v2(bits=4, scale="rms").options() == {"bits": 4, "scale": "rms"}
    assert v2(bits=4, scale="rms").options(True) == {"scale": "rms"}


def test_spec_models_follow_the_same_rule_nested_and_at_their_default():
    """A spec-level field (EvalData.tokens, say) whose default changes, inside a model that is itself
    left at its default: the bare spec records the new value, the old explicit value records nothing."""
    class Eval(BaseModel):
        tokens: int = Field(32768, json_schema_extra={FIRST_DEFAULT: 65536})
        ctx: int = 512

    class Data(BaseModel):
        eval: Eval = Eval()
        runs: list[Eval] = []

    class Spec(BaseModel):
        title: str = ""
        data: Data = Data()

    assert identity_dump(Spec()) == {"data": {"eval": {"tokens": 32768}}}
    assert identity_dump(Spec(data=Data(eval=Eval(tokens=65536)))) == {}
    assert identity_dump(Spec(data=Data(eval=Eval(ctx=1024)))) == {"data": {"eval": {"tokens": 32768, "ctx": 1024}}}
    assert identity_dump(Spec(data=Data(eval=Eval(tokens=65536, ctx=1024)))) == {"data": {"eval": {"ctx": 1024}}}
    assert identity_dump(Spec(data=Data(runs=[Eval(tokens=65536), Eval()]))) == \
        {"data": {"eval": {"tokens": 32768}, "runs": [{}, {"tokens": 32768}]}}


def test_without_declarations_the_identity_is_pydantics_exclude_defaults():
    from quantatlas.spec import parse_spec

    spec = {"title": "t", "model": "reference", "data": {"eval": {"tokens": 32768}}, "seeds": [0, 1],
            # every declared option (act_order, static_groups, scale, propagation) away from both its defaults
            "arms": {"a": {"solver": "gptq", "solver_options": {"act_order": True, "static_groups": True},
                           "codec": {"uniform": {"bits": 4, "clip": "mse", "scale": "half_step"}},
                           "propagation": "parallel",
                           "transforms": [{"hadamard": {}}], "overrides": [{"match": "down", "codec": "q8_0"}],
                           "kv": {"k": "q8_0"},
                           "act": {"codec": {"uniform": {"bits": 8, "group": None, "scale": "half_step"}}}},
                     "b": {"codec": "q4_0", "calib": {"samples": 8}, "propagation": "parallel"}},
            "criterion": {"min_effect": 0.1}}
    model = parse_spec(spec)
    assert identity_dump(model) == model.model_dump(mode="json", exclude_defaults=True)
