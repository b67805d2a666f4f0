"""Left to try is a ranked list of real experiments (issue 24, part 5): budgets by measured bits
(floor(bits + 1/4), never from reference arms), only budgets a codec can produce (checked by building
every proposed codec and counting its stored bits, over every registered codec), an additive model of
log KLD whose effects and uncertainties are checked against an independent fit, the ranking by expected
improvement, the "registered, not run yet" column, and specs that `quantatlas run` takes: on the page
(copy spec) and from `quantatlas suggest --out`."""
import math
import re
from functools import lru_cache

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from scipy import integrate, stats
from typer.testing import CliRunner

from quantatlas.atlas.ledger import Ledger
from quantatlas.quant.config import parse_config, registry
from quantatlas.spec import load_spec, parse_spec
from quantatlas.web import create_app
from quantatlas.web.suggestions import (PRIOR_EFFECT_SD, Atlas, expected_improvement, fit_effects, left_to_try,
                                        suggestions)
from quantatlas.web.techniques import bit_budget, bits_choices, codec_budgets

ENV = {"python": "3.11.7", "packages": {"numpy": "2.4"}, "git_commit": "abc", "device": "cpu", "hostname": "h",
       "platform": "Linux"}
SHAPE = (128, 512)       # a matrix shape every codec takes (trellis tiles of 256, gptvq groups of 256, aqlm of 8)


def _kld(scale: float, seed: int, n: int = 512) -> np.ndarray:
    base = np.random.default_rng(7).gamma(0.6, 0.02, n)
    return (base * scale * np.random.default_rng([seed, int(scale * 1e4)]).lognormal(0, 0.05, n)).astype(np.float32)


def _record(led, exp, arm, kld, bits, seeds=(0,), model_hash="mh", fingerprint="ev"):
    for s in seeds:
        tok = _kld(kld / 0.012, s)
        m = {"kld_mean": float(tok.mean(dtype=np.float64)), "kld_se": float(tok.std() / math.sqrt(tok.size))}
        if bits is not None:
            m["bits_per_weight"] = bits
        led.record_run(exp, arm, s, m, tok, ENV, model_hash, fingerprint)


def _spec(title, arms, control=None, seeds=(0,), tokens=16384):
    s = {"title": title, "model": "reference", "seeds": list(seeds), "data": {"eval": {"tokens": tokens, "ctx": 512}},
         "arms": arms}
    if control:
        s["control"] = control
    return s


@lru_cache(maxsize=None)
def _stored_bits(codec_yaml: str) -> float:
    """Bits per weight of a codec as it stores a SHAPE matrix (torch: builds it and packs zeros)."""
    return parse_config("codec", yaml.safe_load(codec_yaml)).build().bits_per_weight(SHAPE)


def _bits_of(codec: dict) -> float:
    return _stored_bits(yaml.safe_dump(codec, sort_keys=True))


def _codecs() -> list[str]:
    """Every codec quantatlas registers (not the toy ones tests add, which store no real matrix)."""
    return sorted(n for n, cls in registry("codec").items() if cls.__module__.startswith("quantatlas."))


def _typical(name: str) -> dict:
    """A codec's config at a typical setting: 4 bits where its bits option allows it."""
    choices = bits_choices(name)
    if name == "aqlm":
        return {"aqlm": {"codebooks": 1, "code_bits": 8}}
    if name == "dn":   # the lattice dimension is required
        return {"dn": {"n": 8, "bits": 4}}
    if name == "polarquant":   # bits per recursion level (a number or a list): required
        return {"polarquant": {"bits": 4}}
    if not choices:
        return {name: {}}
    return {name: {"bits": 4 if 4 in choices else choices[0]}}


# ---- budgets ----------------------------------------------------------------------------------------

def test_a_budget_is_the_measured_bits_rounded_within_a_quarter_bit():
    # Q3_K_M at 3.88 bits is a 4-bit point (floor made it a 3-bit one); a b-bit format's scales stay in b
    assert [bit_budget(b) for b in (3.88, 2.625, 3.4375, 4.125, 4.5, 4.85, 5.5, 6.5625, 8.5, 9.125)] == \
        [4, 2, 3, 4, 4, 5, 5, 6, 8, 8]
    assert [bit_budget(b) for b in (3.74, 3.75, 1.0, 0.7)] == [3, 4, 1, None]
    # 16-bit formats (fp16, bf16) and anything from 12 bits are no quantization budget
    assert bit_budget(16.0) is None and bit_budget(12.0) is None and bit_budget(None) is None
    assert bit_budget(float("nan")) is None and bit_budget(-1.0) is None


def test_codec_budgets_come_from_the_config_ranges():
    assert sorted(codec_budgets("e8p")) == [2, 3, 4]                    # E8P takes bits 2, 3, 4
    assert sorted(codec_budgets({"uniform": {"bits": 4, "group": 64}})) == [2, 3, 4, 5, 6, 7, 8]
    assert codec_budgets({"uniform": {"bits": 4, "group": 64}})[3] == {"uniform": {"bits": 3, "group": 64,
                                                                                  "symmetric": True, "clip": "minmax",
                                                                                  "scale": "signed_max"}}
    assert codec_budgets("q4_k") == {4: {"q4_k": {}}} and codec_budgets("q3_k") == {3: {"q3_k": {}}}
    assert codec_budgets("q8_0") == {8: {"q8_0": {}}}
    assert codec_budgets("f16") == {} and codec_budgets("aqlm") == {}   # their configs do not say: measured only
    assert 7 not in codec_budgets("gptvq") and 8 not in codec_budgets("gptvq")   # refused by its config
    for name in _codecs():
        if name == "gguf":
            continue
        assert not set(codec_budgets(name)) - set(range(1, 9)), name    # never 16


def test_the_bits_option_is_the_budget_for_every_codec_but_sparse24():
    """Where the config's `bits` option is a codec's budget (its stored bits, counted with torch, agree),
    and where it is not: sparse24 stores 2 of every 4 weights, so left-to-try trusts only its measurements."""
    wrong = set()
    for name in _codecs():
        for bits in bits_choices(name):
            if name == "gptvq" and bits > 4:        # 2^(2 bits) centroids: slow to fit (the same rule)
                continue
            try:
                codec = parse_config("codec", {name: {"bits": bits}})
            except ValueError:
                continue
            if bit_budget(_bits_of(codec.to_spec())) != bits:
                wrong.add(name)
    assert wrong == {"sparse24"}


def _every_codec_atlas(url: str) -> dict:
    """Baselines at 2..8 bits (with an fp16 arm at 16 bits and a `reference: true` arm), and every
    registered codec measured once at a typical setting, its bits counted from what it stores."""
    led = Ledger(url)
    base_arms = {f"int{b}": {"codec": {"uniform": {"bits": b}}} for b in range(2, 9)}
    base_arms["fp16"] = {"codec": None}
    base_arms["ref_q4_0"] = {"codec": "q4_0", "reference": True}
    base = led.register_experiment(_spec("baselines", base_arms))
    for b in range(2, 9):
        _record(led, base, f"int{b}", 0.3 * 4.0 ** -(b - 2), b + 0.125)
    _record(led, base, "fp16", 0.0, 16.0)
    _record(led, base, "ref_q4_0", 0.03, 4.5)
    arms, bits = {}, {}
    for name in _codecs():
        if name == "gguf":
            arms["q3_k_m"] = {"codec": {"gguf": "Q3_K_M"}}
            bits["q3_k_m"] = 3.88
            continue
        arms[name] = {"codec": _typical(name)}
        bits[name] = _bits_of(parse_config("codec", _typical(name)).to_spec())
    arms["e8p2_inc"] = {"codec": {"e8p": {"bits": 2}}, "solver_options": {"incoherence": True}}
    bits["e8p2_inc"] = _bits_of({"e8p": {"bits": 2}})
    every = led.register_experiment(_spec("every codec", arms))
    for arm, b in bits.items():
        _record(led, every, arm, 0.3 * 4.0 ** -(b - 2) * (1.3 if arm.startswith("q") else 1.0), b)
    led.close()
    return {"base": base, "every": every}


def test_left_to_try_never_proposes_a_budget_a_codec_cannot_produce(tmp_path):
    url = f"sqlite:///{tmp_path / 'every.db'}"
    ids = _every_codec_atlas(url)
    with Ledger(url) as led:
        data = left_to_try(led, limit=10_000)
    found = data["suggestions"]
    assert len(found) > 30
    checked = set()
    for s in found:
        spec = parse_spec(s["spec"])                 # every suggestion is a spec quantatlas run takes
        treatment = spec.arms[s["arm"]]
        # never from a reference arm (fp16 at 16 bits, `reference: true`), never a 16-bit budget
        assert (s["base"]["experiment"], s["base"]["arm"]) not in {(ids["base"], "fp16"), (ids["base"], "ref_q4_0")}
        assert 1 <= s["budget"] <= 8
        if treatment.codec is None or treatment.overrides:
            continue
        codec = treatment.codec.to_spec()
        if treatment.codec.name == "gguf":
            assert s["budget"] == 4, s                           # Q3_K_M at 3.88 bits: a 4-bit point, only
            continue
        assert bit_budget(_bits_of(codec)) == s["budget"], (s["arm"], codec, s["budget"])
        checked.add(treatment.codec.name)
    # the codecs moved or swapped to other budgets were checked, sparse24 only where it was measured
    assert {"e8p", "uniform", "trellis", "turbo", "lloyd_max", "d4", "e8", "nestquant", "gptvq"} <= checked
    assert all(s["budget"] == 3 for s in found if s["spec"]["arms"][s["arm"]].get("codec", {}).get("sparse24"))
    assert not [s for s in found if "e8p" in (s["spec"]["arms"][s["arm"]].get("codec") or {})
                and s["budget"] not in (2, 3, 4)]
    # the coverage tables: no 16-bit budget; a codec "not yet at" only budgets it produces
    assert data["budgets"] == [1, 2, 3, 4, 5, 6, 8] or 16 not in data["budgets"]
    per = {t["technique"]: t for t in data["technique_budgets"]}
    assert set(per["codec:e8p"]["missing"]) <= {2, 3, 4}
    assert per["gguf:Q3_K_M"]["covered"] == [4] and per["gguf:Q3_K_M"]["missing"] == []
    assert per["codec:q4_k"]["missing"] == [] and per["codec:sparse24"]["missing"] == []
    for gap in data["pair_budget_gaps"]:
        if "codec:e8p" in (gap["a"], gap["b"]):
            assert set(gap["missing"]) <= {2, 3, 4}


# ---- the additive model and the ranking --------------------------------------------------------------

def _effects_atlas(url: str, seeds=(0,)):
    """Three experiments where a Hadamard rotation halves KLD, at 3 and 4 bits; GPTQ helps by 20 %."""
    led = Ledger(url)
    ids = []
    for i, (b, level) in enumerate(((4, 0.02), (3, 0.08), (4, 0.025))):
        grid = {"bits": b, "scale": "absmax"}   # first defaults throughout: one technique apart
        arms = {"rtn": {"codec": {"uniform": grid}},
                "had": {"codec": {"uniform": grid}, "transforms": [{"hadamard": {}}]},
                "gptq": {"solver": "gptq", "codec": {"uniform": grid}, "propagation": "sequential",
                         "solver_options": {"act_order": False, "static_groups": False}}}
        exp = led.register_experiment(_spec(f"e{i}", arms, "rtn", seeds, tokens=16384 + 512 * i))
        _record(led, exp, "rtn", level, b + 0.125, seeds)
        _record(led, exp, "had", level * 0.5, b + 0.125, seeds)
        _record(led, exp, "gptq", level * 0.8, b + 0.125, seeds)
        ids.append(exp)
    # a plan: GPTQ after a Hadamard rotation at 4 bits, registered and not run
    plan = led.register_experiment(_spec("plan", {"had_gptq": {"solver": "gptq",
                                                               "codec": {"uniform": {"bits": 4, "scale": "absmax"}},
                                                               "propagation": "sequential",
                                                               "transforms": [{"hadamard": {}}],
                                                               "solver_options": {"act_order": False,
                                                                                  "static_groups": False}}}))
    led.close()
    return ids, plan


def test_the_additive_model_recovers_the_measured_effects(tmp_path):
    url = f"sqlite:///{tmp_path / 'fx.db'}"
    _effects_atlas(url)
    with Ledger(url) as led:
        atlas = Atlas(led)
    model = fit_effects(atlas.points)
    pts = [p for p in atlas.points if p["kld_mean"] > 0]
    assert model.n_points == len(pts) == 9
    # an independent fit: the same design, solved as a ridge least squares with the same priors
    names = sorted({t for p in pts for t in p["techniques"]})
    levels = sorted({(p["group"], bit_budget(p["bits_per_weight"])) for p in pts}, key=repr)
    X = np.array([[float((p["group"], bit_budget(p["bits_per_weight"])) == lv) for lv in levels]
                  + [p["bits_per_weight"] - bit_budget(p["bits_per_weight"])]
                  + [float(t in p["techniques"]) for t in names] for p in pts])
    y = np.log([p["kld_mean"] for p in pts])
    lam = model.noise_sd ** 2 * np.concatenate([np.full(len(levels), 1e-6), [0.5 ** -2],
                                                np.full(len(names), PRIOR_EFFECT_SD ** -2)])
    prior = np.zeros(X.shape[1])
    prior[len(levels)] = -math.log(4)
    theta = np.linalg.solve(X.T @ X + np.diag(lam), X.T @ y + lam * prior)
    for t in names:
        assert model.effect(t)[0] == pytest.approx(theta[len(levels) + 1 + names.index(t)], abs=1e-9)
    # the shrunken effects are close to the truth: log 0.5 for the rotation, log 0.8 for GPTQ
    assert model.effect("transform:hadamard")[0] == pytest.approx(math.log(0.5), abs=0.06)
    assert model.effect("solver:gptq")[0] == pytest.approx(math.log(0.8), abs=0.06)
    assert model.effect("transform:hadamard")[1] < 0.2 < PRIOR_EFFECT_SD == model.effect("never:seen")[1]


def test_expected_improvement_is_the_mean_of_the_positive_part():
    for m, sd in ((0.3, 0.2), (-0.4, 0.5), (0.0, 1.0), (1.2, 0.05)):
        numeric, _ = integrate.quad(lambda g: max(g, 0.0) * stats.norm.pdf(g, m, sd), m - 12 * sd, m + 12 * sd,
                                    points=[0.0], limit=200)
        assert expected_improvement(m, sd) == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    assert expected_improvement(0.5, 0.0) == 0.5 and expected_improvement(-0.5, 0.0) == 0.0


def test_suggestions_rank_by_expected_improvement_and_list_registered_arms(tmp_path):
    url = f"sqlite:///{tmp_path / 'rank.db'}"
    ids, plan = _effects_atlas(url)
    with Ledger(url) as led:
        found = suggestions(led, limit=200)
    ei = [s["expected_improvement"] for s in found]
    assert ei == sorted(ei, reverse=True) and [s["rank"] for s in found] == list(range(1, len(found) + 1))
    for s in found:
        g = s["frontier_gain"]
        assert s["expected_improvement"] == pytest.approx(expected_improvement(g["mean"], g["sd"]))
        assert s["p_beats_frontier"] == pytest.approx(stats.norm.cdf(g["mean"] / g["sd"]))
        assert s["predicted_kld"] == pytest.approx(s["base"]["kld_mean"] * math.exp(s["log_kld_change"]["mean"]))
    # no suggestion repeats what was measured on its plot and budget
    keys = [(s["model_hash"], tuple(s["techniques"]), s["budget"]) for s in found]
    assert len(keys) == len(set(keys))
    # GPTQ on a rotated arm at 4 bits: what the registered, unrun arm would measure
    stack = [s for s in found if s["budget"] == 4 and set(s["techniques"]) == {"codec:uniform", "solver:gptq",
                                                                               "transform:hadamard"}]
    assert stack and all(s["planned"] == [{"experiment": plan, "arm": "had_gptq"}] for s in stack)
    # the rotation at half the KLD and GPTQ at 0.8 together: predicted 0.5 * 0.8 of the rtn arm
    s = next(s for s in stack if s["base"]["arm"] == "had")
    assert s["kld_factor"]["mean"] == pytest.approx(0.8, abs=0.06)
    assert s["rank"] <= 3


def test_suggestion_specs_copy_from_the_page_and_quantatlas_suggest_writes_one(tmp_path, monkeypatch):
    from quantatlas.cli import app

    url = f"sqlite:///{tmp_path / 'spec.db'}"
    _effects_atlas(url)
    with TestClient(create_app(url)) as client:
        html = client.get("/left-to-try").text
        api = client.get("/api/left-to-try", params={"limit": 2}).json()
        none = client.get("/api/left-to-try", params={"model": "hf:nobody/none"}).json()
    assert len(api["suggestions"]) == 2 and none["suggestions"] == []
    first = api["suggestions"][0]
    assert '<button type="button" class="copy" data-copy="spec-1">copy spec</button>' in html
    block = re.search(r'<pre class="spec small" id="spec-1">(.*?)</pre>', html, re.S).group(1)
    import html as html_lib
    assert yaml.safe_load(html_lib.unescape(block)) == first["spec"]
    assert "navigator.clipboard" in html
    out = tmp_path / "specs" / "next.yaml"
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["suggest", "--db", url, "--limit", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert first["arm"] in res.output and f"spec: {out}" in res.output
    spec = load_spec(out)                                # the written spec parses (and would run)
    assert first["arm"] in spec.arms and spec.control in spec.arms and len(spec.seeds) >= 3
    assert spec.model == "reference" and spec.data.eval.tokens == first["spec"]["data"]["eval"]["tokens"]
    empty = CliRunner().invoke(app, ["suggest", "--db", f"sqlite:///{tmp_path / 'empty.db'}", "--out",
                                     str(tmp_path / "x.yaml")])
    assert empty.exit_code == 2 and "nothing to suggest" in empty.output and not (tmp_path / "x.yaml").exists()
