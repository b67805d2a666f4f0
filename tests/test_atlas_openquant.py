"""The OpenQuant experiments as specs: one valid spec per distinct hypothesis of the listing,
each naming its OpenQuant id(s), each a distinct experiment; registered next to the imported
listing, each is flagged against (or closest to) its own OpenQuant row."""
import json
import re
from pathlib import Path

import pytest

from quantatlas.atlas.ledger import Ledger
from quantatlas.atlas.similarity import similarity
from quantatlas.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "experiments" / "openquant").glob("*.yaml"))
LISTING = ROOT.parent / "shared" / "data" / "openquant_listing.jsonl"
if not LISTING.is_file():
    LISTING = Path("/work/shared/data/openquant_listing.jsonl")
ROWS = [json.loads(line) for line in LISTING.read_text().splitlines() if line.strip()]


def test_one_spec_per_distinct_hypothesis():
    distinct = {r["hypothesis"] for r in ROWS}
    assert len(SPECS) == len(distinct) == 13
    named = {}
    for path in SPECS:
        spec = load_spec(path)            # validates, or raises naming file, field and line
        ids = re.findall(r"cexp_[0-9a-f]{6}", spec.notes or "")
        assert ids, f"{path.name}: notes must name the OpenQuant id"
        named[path.name] = ids[0]
        assert spec.model == "reference" and spec.seeds == [0, 1, 2]
        assert (spec.data.eval.tokens, spec.data.eval.ctx) == (32768, 512)
        assert "openquant" in spec.tags
        assert spec.control is None or spec.control in spec.arms
        # the id named is the listing row whose hypothesis reads most like this spec's
        best = max(ROWS, key=lambda r: similarity(r["hypothesis"], spec.hypothesis))
        assert best["hypothesis"] == next(r["hypothesis"] for r in ROWS if r["id"] == ids[0]), path.name
    # every distinct listing hypothesis has its spec
    covered = {next(r["hypothesis"] for r in ROWS if r["id"] == i) for i in named.values()}
    assert covered == distinct


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_baselines_have_no_control_and_treatments_have_one(path):
    spec = load_spec(path)
    if "baseline" in spec.tags:
        assert spec.control is None and len(spec.arms) == 1
    else:
        assert spec.control is not None and len(spec.arms) >= 2


def test_registered_next_to_the_listing(tmp_path):
    led = Ledger(f"sqlite:///{tmp_path / 'atlas.db'}")
    led.import_lines(LISTING.read_text().splitlines(), "listing")
    named = {}
    for p in SPECS:
        spec = load_spec(p)
        spec = spec.for_model(spec.model_names()[0])   # a study's first model: the listing's rows are reference's
        named[led.register_experiment(spec.to_dict())] = re.findall(r"cexp_[0-9a-f]{6}", spec.notes)[0]
    assert len(named) == 13 and all(i.startswith("cexp_") for i in named)
    rows = {r["id"]: r for r in led.rows()}
    flagged = {i: rows[i]["duplicate_of"] for i in named if rows[i]["duplicate_of"]}
    # near-identical wording is flagged against the original row (not its repeat); the
    # shortened paraphrases (similarity ~0.6-0.7) are not
    assert len(flagged) >= 9 and all(flagged[i] == named[i] for i in flagged)
