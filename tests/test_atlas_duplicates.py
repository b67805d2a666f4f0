"""Duplicates: the OpenQuant listing's four repeats are flagged (and only they), near-identical
hypothesis text is scored, the same spec is one experiment, merging after a look."""
import json
from pathlib import Path

import pytest

from quantatlas.atlas.ledger import Ledger, LedgerError
from quantatlas.atlas.similarity import DUPLICATE_THRESHOLD, normalise_text, similarity

LISTING = Path(__file__).resolve().parents[2] / "shared" / "data" / "openquant_listing.jsonl"
if not LISTING.is_file():
    LISTING = Path("/work/shared/data/openquant_listing.jsonl")

SPEC = {"title": "t", "hypothesis": "Q8_0 should be near-lossless and is the standard high-quality reference.",
        "model": "reference", "seeds": [0], "arms": {"q8": {"codec": "q8_0"}}}


@pytest.fixture
def led(tmp_path):
    return Ledger(f"sqlite:///{tmp_path / 'atlas.db'}", contributor="tester")


def listing_rows():
    return [json.loads(line) for line in LISTING.read_text().splitlines() if line.strip()]


def test_importing_the_openquant_listing_flags_exactly_the_four_repeats(led):
    rows = listing_rows()
    assert len(rows) == 17
    # the repeats, found independently: a row whose exact hypothesis appeared on an earlier row
    seen, repeats = {}, {}
    for r in rows:
        if r["hypothesis"] in seen:
            repeats[r["id"]] = seen[r["hypothesis"]]
        else:
            seen[r["hypothesis"]] = r["id"]
    assert len(repeats) == 4
    summary = led.import_lines(LISTING.read_text().splitlines(), str(LISTING))
    assert summary["experiments"] == 17
    listed = led.rows()
    assert [r["id"] for r in listed] == [r["id"] for r in rows]          # ids kept, in order
    flagged = {r["id"]: r["duplicate_of"] for r in listed if r["duplicate_of"]}
    assert flagged == repeats
    assert all(r["duplicate_score"] == 1.0 for r in listed if r["duplicate_of"])
    by_id = {r["id"]: r for r in listed}
    for r in rows:   # the other platform's columns are kept; its results are claims, not verdicts
        assert by_id[r["id"]]["result"] is None
        assert by_id[r["id"]]["claim"] == r["result"]
        assert by_id[r["id"]]["claim_status"] == "imported claim, unverified"
        assert by_id[r["id"]]["reproductions_column"] == r["reproductions_column"]
        assert by_id[r["id"]]["confidence"] is None
    again = led.import_lines(LISTING.read_text().splitlines(), str(LISTING))
    assert (again["experiments"], again["existing"]) == (0, 17)
    assert len(led.rows()) == 17


def test_similarity_scores():
    a = "Softmax amplifies K-side errors more than V-side errors; the gap should grow with context length"
    assert similarity(a, a) == 1.0
    assert similarity(a, a.upper().replace(";", " —")) == 1.0             # case and punctuation
    assert normalise_text("  Q4_K_M — is  THE best! ") == "q4_k_m is the best"
    small_edit = a.replace("should grow", "grows")
    assert DUPLICATE_THRESHOLD <= similarity(a, small_edit) < 1.0
    other = "Q8_0 should be near-lossless and is the standard high quality reference"
    assert similarity(a, other) < 0.4
    assert similarity("", a) == 0.0
    # every pair of distinct listing hypotheses stays well under the threshold
    texts = sorted({r["hypothesis"] for r in listing_rows()})
    worst = max(similarity(x, y) for i, x in enumerate(texts) for y in texts[i + 1:])
    assert worst < DUPLICATE_THRESHOLD - 0.3


def test_near_identical_hypothesis_under_a_new_spec_is_flagged_with_its_score(led):
    a = led.register_experiment(SPEC)
    b = led.register_experiment(dict(SPEC, hypothesis="Q8_0 should be near lossless, and is the standard "
                                                      "high-quality reference", seeds=[0, 1]))
    c = led.register_experiment(dict(SPEC, hypothesis="Something unrelated about group sizes.", seeds=[0, 1, 2]))
    rows = {r["id"]: r for r in led.rows()}
    assert rows[b]["duplicate_of"] == a and rows[b]["duplicate_score"] >= DUPLICATE_THRESHOLD
    assert rows[a]["duplicate_of"] is None and rows[c]["duplicate_of"] is None


def test_same_spec_is_the_same_experiment(led):
    a = led.register_experiment(SPEC)
    assert led.register_experiment(dict(reversed(list(SPEC.items())), title="retitled")) == a
    assert len(led.rows()) == 1


def test_merge_after_a_look(led):
    led.import_lines(LISTING.read_text().splitlines(), "listing")
    mine = led.register_experiment(dict(SPEC, hypothesis="Q8_0 should be near-lossless and is the standard "
                                                         "\"high quality\" reference", seeds=[0, 1, 2]))
    row = {r["id"]: r for r in led.rows()}[mine]
    assert row["duplicate_of"] == "cexp_8f394c"
    # attach runs to mine, then merge it into the imported id
    env = {"device": "cpu", "packages": {}, "git_commit": "x", "hostname": "h"}
    for seed in (0, 1, 2):
        led.record_run(mine, "q8", seed, {"kld_mean": 0.001, "bits_per_param": 8.5}, None, env, "m", "f")
    r = led.merge("cexp_8f394c", mine)
    assert r == {"kept": "cexp_8f394c", "merged": mine, "similarity": row["duplicate_score"]}
    rows = {r["id"]: r for r in led.rows()}
    assert mine not in rows
    kept = rows["cexp_8f394c"]
    assert kept["aliases"] == [mine] and kept["result_via"] == mine and kept["result"] == "baseline"
    assert kept["confidence"] is not None
    assert mine in {r["id"] for r in led.rows(include_merged=True)}
    led.merge("cexp_2067d8", "cexp_194e36")
    assert "cexp_194e36" not in {r["id"] for r in led.rows()}
    with pytest.raises(LedgerError, match="itself"):
        led.merge("cexp_2067d8", "cexp_2067d8")
    with pytest.raises(LedgerError, match="already merged"):
        led.merge("cexp_fd30cf", "cexp_194e36")
    with pytest.raises(LedgerError, match="is itself merged"):
        led.merge("cexp_194e36", "cexp_fd30cf")
    with pytest.raises(LedgerError, match="unknown experiment id"):
        led.merge("cexp_2067d8", "cexp_zzzzzz")
