"""Content-addressed ids: what changes an experiment id and what does not; environment keys;
the atlas imports without torch."""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantatlas.atlas import ids

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "title": "GPTQ beats RTN", "hypothesis": "GPTQ lowers KLD.", "tags": ["gptq"], "notes": "n",
    "model": "reference", "data": {"eval": {"tokens": 32768, "ctx": 512}}, "seeds": [0, 1, 2], "control": "rtn",
    "arms": {"rtn": {"solver": "rtn", "codec": {"uniform": {"bits": 4, "group": 128}}},
             "gptq": {"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 128}},
                      "transforms": [{"hadamard": {}}, {"equalize": {"alpha": 0.15}}]}},
    "criterion": {"metric": "kld_mean", "min_effect": 0.05},
}


def exp_id(spec) -> str:
    _, identity = ids.normalise_spec(spec)
    return ids.experiment_id(ids.spec_hash(identity))


def _reorder(value):
    """The same mapping with every key order reversed (recursively)."""
    if isinstance(value, dict):
        return {k: _reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reorder(v) for v in value]
    return value


def test_id_format_and_invariance_to_key_order_free_text_defaults_and_number_spelling():
    base = exp_id(SPEC)
    assert re.fullmatch(r"cexp_[0-9a-f]{8}", base)
    assert exp_id(_reorder(SPEC)) == base
    assert exp_id(json.loads(json.dumps(SPEC, indent=4))) == base
    free = dict(SPEC, title="  other ", hypothesis="a different sentence", tags=["x", "y"], notes=None)
    assert exp_id(free) == base
    # defaults written out (or left out) do not matter: solver rtn, alpha 0.01, propagation ...
    explicit = copy.deepcopy(SPEC)
    explicit["criterion"].update(better="lower", alpha=0.01)
    explicit["arms"]["rtn"].update(propagation="sequential", overrides=[], kv=None)
    explicit["data"]["calib"] = {"samples": 64}
    assert exp_id(explicit) == base
    floats = copy.deepcopy(SPEC)
    floats["arms"]["rtn"]["codec"]["uniform"]["bits"] = 4.0
    assert exp_id(floats) == base
    codec_name_only = copy.deepcopy(SPEC)
    codec_name_only["arms"]["rtn"]["codec"] = "q8_0"
    as_mapping = copy.deepcopy(SPEC)
    as_mapping["arms"]["rtn"]["codec"] = {"q8_0": None}
    assert exp_id(codec_name_only) == exp_id(as_mapping) != base


@pytest.mark.parametrize("change", [
    lambda s: s["arms"]["gptq"]["codec"]["uniform"].update(bits=3),
    lambda s: s.update(seeds=[0, 1]),
    lambda s: s.update(model="hf:Qwen/Qwen3-0.6B"),
    lambda s: s["arms"]["gptq"]["transforms"].reverse(),          # order of transforms matters
    lambda s: s["criterion"].update(min_effect=0.1),
    lambda s: s["data"]["eval"].update(ctx=1024),
    lambda s: s["arms"].update(extra={"codec": "q8_0"}),
])
def test_what_the_experiment_does_changes_the_id(change):
    other = copy.deepcopy(SPEC)
    change(other)
    assert exp_id(other) != exp_id(SPEC)


def test_family_hash_ignores_only_the_model():
    _, a = ids.normalise_spec(SPEC)
    _, b = ids.normalise_spec(dict(SPEC, model="hf:Qwen/Qwen3-0.6B"))
    _, c = ids.normalise_spec(dict(SPEC, seeds=[5]))
    assert ids.family_hash(a) == ids.family_hash(b) != ids.family_hash(c)


def test_invalid_spec_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match="control"):
        ids.normalise_spec(dict(SPEC, control="nope"))
    with pytest.raises(ValueError, match="mapping"):
        ids.normalise_spec(["not", "a", "spec"])


def test_environment_key_counts_device_packages_commit_and_host_only():
    env = {"python": "3.11", "packages": {"torch": "2.13", "numpy": "2.4"}, "git_commit": "abc",
           "device": "cuda:H100", "hostname": "a", "platform": "Linux", "argv": ["x"]}
    key = ids.environment_key(env)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert ids.environment_key(dict(env, python="3.12", platform="other", argv=[])) == key
    assert ids.environment_key(dict(env, packages={"numpy": "2.4", "torch": "2.13"})) == key
    for field, value in (("device", "cpu"), ("git_commit", "def"), ("hostname", "b"),
                         ("packages", {"torch": "2.12", "numpy": "2.4"})):
        assert ids.environment_key(dict(env, **{field: value})) != key


def test_the_atlas_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import quantatlas.atlas, quantatlas.atlas.ledger, quantatlas.atlas.cli, quantatlas.atlas.io\n"
            "from quantatlas.atlas.ledger import Ledger\n"
            "led = Ledger(sys.argv[1]); e = led.register_experiment(" + repr(SPEC) + ")\n"
            "print(e, led.verdicts(e))\n")
    out = subprocess.run([sys.executable, "-c", code, "sqlite://"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("cexp_") and out.stdout.split()[0] == exp_id(SPEC)
