"""Reference arms and the primary arm (issue 24, part 2): an arm that quantizes nothing (fp16) or that
the spec marks `reference: true` is a reference point, shown but never judged as a treatment and never
the experiment's result; the experiment's result and confidence are one arm's, the primary arm's
(`primary:` or the best treatment), and the list row shows that arm's metrics beside them. The new
Arm field changes no stored arm key and no experiment id."""
import glob
from pathlib import Path

import numpy as np
import pytest
import yaml

from quantatlas import runner
from quantatlas.atlas.ledger import Ledger
from quantatlas.atlas.stored import StoredSpec
from quantatlas.atlas.verdict import Criterion, RunSetInfo, SeedRun, combine_run_sets, experiment_result, judge_run_set
from quantatlas.quant.steps import is_reference
from quantatlas.spec import Arm, parse_spec, stable_arm_config

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(glob.glob(str(ROOT / "experiments" / "**" / "*.yaml"), recursive=True))


# ---- the field: no stored key or id changes --------------------------------------------------------

def test_reference_changes_no_arm_key_and_no_experiment_id():
    assert len(SPECS) > 20
    for path in SPECS:
        raw = yaml.safe_load(Path(path).read_text())
        spec = parse_spec(raw, path)
        for name, arm in spec.to_dict()["arms"].items():
            if raw["arms"][name].get("reference") is True:   # a spec that marks a reference point: its own key
                assert arm["reference"] is True and stable_arm_config(arm)["reference"] is True
                continue
            # the arm's dump (what the ledger stores, what runner.arm_key hashes) has no `reference` key
            assert "reference" not in arm and "reference" not in stable_arm_config(arm), (path, name)
            assert stable_arm_config(arm) == stable_arm_config(dict(arm, reference=False))
            key = runner.arm_key(arm, "mh", "ef")
            assert runner.arm_key(dict(arm, reference=False), "mh", "ef") == key
            assert runner.arm_key(dict(arm, reference=True), "mh", "ef") != key
        explicit = dict(raw, arms={n: dict(a, reference=a.get("reference", False)) for n, a in raw["arms"].items()})
        assert parse_spec(explicit, path).spec_hash() == spec.spec_hash(), path
        assert parse_spec(explicit, path).to_dict() == spec.to_dict()


def test_reference_true_makes_a_reference_arm():
    q8 = Arm.model_validate({"codec": "q8_0"})
    assert not is_reference(q8) and is_reference(Arm.model_validate({"codec": "q8_0", "reference": True}))
    assert is_reference(Arm.model_validate({"codec": None}))
    marked = Arm.model_validate({"codec": "q8_0", "reference": True}).model_dump(mode="json")
    assert marked["reference"] is True and stable_arm_config(marked)["reference"] is True


# ---- the verdict ----------------------------------------------------------------------------------

N = 48 * 255


def runs(scale: float, seeds=(0, 1, 2), fixed: bool = True) -> dict[int, SeedRun]:
    base = np.random.default_rng(5).gamma(0.6, 0.02, N)
    out = {}
    for s in seeds:
        tok = (base * scale * np.random.default_rng([int(scale * 1000), 0 if fixed else s]).lognormal(0, 0.15, N)
               ).astype(np.float32)
        out[s] = SeedRun(s, {"kld_mean": float(tok.mean(dtype=np.float64)), "bits_per_param": 4.5}, tok)
    return out


SPEC = {"title": "t", "model": "reference", "control": "rtn4", "data": {"eval": {"ctx": 512}},
        "arms": {"fp16": {"codec": None}, "q8ref": {"codec": "q8_0", "reference": True},
                 "rtn4": {"codec": {"uniform": {"bits": 4}}}, "rtn3": {"codec": {"uniform": {"bits": 3}}},
                 "rtn4_alt": {"codec": {"uniform": {"bits": 4, "group": 64}}}}}


def test_reference_arms_are_baselines_outside_holms_family():
    arms = {"fp16": {s: SeedRun(s, {"kld_mean": 0.0}, np.zeros(N, np.float32)) for s in (0, 1, 2)},
            "q8ref": runs(0.05), "rtn4": runs(1.0), "rtn3": runs(2.0), "rtn4_alt": runs(0.9)}
    out = judge_run_set(arms, list(arms), "rtn4", Criterion(), StoredSpec(SPEC))
    assert {a: (out[a].result, out[a].rule) for a in ("fp16", "q8ref")} == \
        {"fp16": ("baseline", "reference"), "q8ref": ("baseline", "reference")}
    assert out["fp16"].notes == ["it quantizes nothing"]
    assert out["q8ref"].notes == ["the spec marks it `reference: true`"]
    # Holm over the two treatments only (rtn3, rtn4_alt): the reference arms are no family members
    ps = sorted([out["rtn3"].p_value, out["rtn4_alt"].p_value])
    assert sorted([out["rtn3"].p_adjusted, out["rtn4_alt"].p_adjusted]) == \
        pytest.approx([min(1, 2 * ps[0]), max(min(1, 2 * ps[0]), ps[1])])
    info = RunSetInfo(1, (("h", "cpu"), "me"), "me@h")
    finals = [combine_run_sets([(info, out)], a, Criterion(), []) for a in arms]
    fp16 = next(f for f in finals if f.arm == "fp16")
    assert fp16.text.startswith("reference: fp16 is a reference point, not judged as a treatment")
    assert fp16.as_dict(Criterion())["reference"] is True
    # the experiment is its best treatment's (rtn4_alt, 10 % better), never fp16 (KLD 0) or q8ref
    result, confidence, pick = experiment_result(finals, has_treatments=True, crit=Criterion())
    assert pick.arm == "rtn4_alt" and (result, confidence) == (pick.result, pick.confidence)
    named = experiment_result(finals, has_treatments=True, primary="rtn3", crit=Criterion())
    assert named[2].arm == "rtn3" and named[0] == "failure"


# ---- end to end: the runner, the ledger, the list row ---------------------------------------------

def test_an_fp16_arm_never_decides_the_experiment_its_primary_arm_does(tiny_reference, tmp_path):
    """The issue's spec (fp16, rtn4 control, gptq4) and a marked reference arm, run on the tiny model:
    fp16 used to be a "success" against rtn4 and the row "success 0.75" beside gptq4's metrics."""
    url = f"sqlite:///{tmp_path / 'ref.db'}"
    spec = {"title": "fp16 beside RTN and GPTQ", "hypothesis": "GPTQ int4 beats RTN int4.",
            "data": {"eval": {"tokens": 1024, "ctx": 128}, "calib": {"samples": 2, "seq_len": 32}},
            "seeds": [0, 1], "control": "rtn4",
            "arms": {"fp16": {"codec": None},
                     "q8ref": {"codec": "q8_0", "reference": True},
                     "rtn4": {"codec": {"uniform": {"bits": 4, "group": 32}}},
                     "gptq4": {"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 32}}}}}
    doc = runner.run_spec(spec, db_url=url, loaded=tiny_reference, compress=False, log=lambda m: None)
    led = Ledger(url)
    v = {x["arm"]: x for x in led.verdicts(doc["experiment_id"])}
    assert {a: (v[a]["result"], v[a]["rule"]) for a in ("fp16", "q8ref", "rtn4")} == \
        {"fp16": ("baseline", "reference"), "q8ref": ("baseline", "reference"), "rtn4": ("baseline", "baseline")}
    assert v["fp16"]["treatment_mean"] == 0.0 and v["q8ref"]["treatment_mean"] < v["gptq4"]["treatment_mean"]
    g = v["gptq4"]
    assert (g["result"], g["rule"]) == ("inconclusive", "too_few_seeds")   # GPTQ is seeded; 2 seeds
    (row,) = led.rows()
    assert row["primary"] == "gptq4"
    assert (row["result"], row["confidence"]) == (g["result"], g["confidence"])
    assert row["key_metrics"].startswith("gptq4: KLD") and "fp16" not in row["key_metrics"]
    metrics = led.runs(doc["experiment_id"])
    gptq_kld = np.mean([r["metrics"]["kld_mean"] for r in metrics if r["arm"] == "gptq4"])
    assert row["metrics"]["gptq4"]["kld_mean"] == pytest.approx(gptq_kld)
    assert f"KLD {gptq_kld:.4g}" in row["key_metrics"]
    led.close()


# ---- how the list and the page write numbers ------------------------------------------------------

def test_metrics_are_written_as_a_reader_needs_them():
    from quantatlas.atlas.listing import format_metric, human_bytes

    assert human_bytes(2_081_000) == "2.08 MB" and human_bytes(950) == "950 B" and human_bytes(12_345) == "12.3 kB"
    assert human_bytes(123_456_789) == "123 MB" and human_bytes(1.5e9) == "1.50 GB"
    assert format_metric("bytes_zstd", 2_081_000.0) == "2.08 MB" and format_metric("artifact_bytes", 950) == "950 B"
    # 4 significant digits would write 1.0004 as 1 and 1.00049 as 1.000: a ratio near 1 gets 4 decimals
    assert format_metric("ppl_ratio", 1.00042) == "1.0004" and format_metric("ppl_ratio", 1.0) == "1.0000"
    assert format_metric("kld_mean", 0.0012345) == "0.001234" and format_metric("kld_mean", 2e-5) == "2.000e-05"
    assert format_metric("bits_per_param", 4.4583) == "4.458" and format_metric("seed", 3) == "3"
    assert format_metric("kld_mean", None) == "–" and format_metric("kld_max", float("inf")) == "inf"


def test_the_pages_show_bytes_ratios_holm_and_a_favicon(tmp_path):
    from fastapi.testclient import TestClient

    from quantatlas.web import create_app

    url = f"sqlite:///{tmp_path / 'w.db'}"
    led = Ledger(url)
    spec = dict(SPEC, seeds=[0, 1], arms={"rtn4": {"codec": {"uniform": {"bits": 4}}},
                                          "gptq4": {"solver": "gptq", "codec": {"uniform": {"bits": 4}}},
                                          "fp16": {"codec": None}})
    e = led.register_experiment(spec)
    env = {"device": "cpu", "hostname": "h", "packages": {}, "git_commit": "c"}
    for arm, scale in (("rtn4", 1.0), ("gptq4", 0.8), ("fp16", 0.0)):
        for s, r in runs(scale, (0, 1), fixed=arm != "gptq4").items():
            m = dict(r.metrics, bytes_zstd=2_081_000.0, ppl_ratio=1.00042)
            led.record_run(e, arm, s, m, r.per_token, env, "mh", "ef")
    led.add_hypothesis("cexp_2067d8", "An imported claim.", "success", imported={"reproductions_column": "1/5"})
    led.close()
    with TestClient(create_app(url)) as client:
        page = client.get(f"/experiments/{e}").text
        assert "2.08 MB" in page and "2.081e+06" not in page and "1.0004" in page
        holm = page[page.index('<table class="verdicts">'):page.index("</table>")]
        assert "too few seeds</span>" in holm and "reference</span>" in holm and "control</span>" in holm
        listing = client.get("/").text
        assert '<th class="num">Conf.</th>' in listing and 'rel="icon"' in listing
        assert listing.index(e) < listing.index("cexp_2067d8")            # the imported claim below
        assert f'data-id="{e}" data-primary="gptq4"' in listing
        icon = client.get("/static/favicon.svg")
        assert icon.status_code == 200 and icon.text.startswith("<svg")
