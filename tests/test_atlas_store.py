"""The ledger as a store: a write block commits as a whole or not at all and reads its own writes;
reads hand out snapshots; the stored spec is parsed once into the one Criterion and the one seeded
predicate; and no module outside the store touches its sessions or private members (read from
the source with ast)."""
import ast
from pathlib import Path

import numpy as np
import pytest

from quantatlas.atlas import ids
from quantatlas.atlas.errors import LedgerError
from quantatlas.atlas.ledger import Ledger
from quantatlas.atlas.records import RecordError
from quantatlas.atlas.stored import StoredSpec
from quantatlas.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"title": "GPTQ beats RTN", "hypothesis": "GPTQ lowers KLD against RTN at equal bits.", "tags": ["gptq"],
        "model": "reference", "seeds": [0, 1, 2], "control": "rtn4",
        "data": {"eval": {"tokens": 4096, "ctx": 256}},
        "arms": {"rtn4": {"codec": {"uniform": {"bits": 4}}},
                 "gptq4": {"solver": "gptq", "codec": {"uniform": {"bits": 4}}}},
        "criterion": {"metric": "kld_mean", "better": "lower", "min_effect": 0.1, "alpha": 0.05}}
ENV = {"python": "3.11", "packages": {"numpy": "2.4"}, "git_commit": "abc", "device": "cpu", "hostname": "h1",
       "platform": "Linux"}


def test_a_write_block_commits_whole_or_not_at_all_and_reads_its_own_writes(new_db):
    led = Ledger(new_db(), contributor="ann")
    normal = ids.normalise_spec(SPEC)
    tok = np.linspace(0.0, 0.2, 510, dtype=np.float32)
    with pytest.raises(RuntimeError):
        with led.write() as tx:
            exp = tx.register(normal, "ann")
            tx.record(exp, "rtn4", 0, {"kld_mean": 0.1}, tok, ENV, "m", "f", "ann")
            raise RuntimeError("the caller fails half-way")
    with led.read() as q:
        assert q.experiments() == [] and q.run_ids() == []          # nothing of the block was kept
    with led.write() as tx:
        exp = tx.register(normal, "ann")
        rid, new = tx.record(exp, "rtn4", 0, {"kld_mean": 0.1, "ppl": float("inf")}, tok, ENV, "m", "f", "ann")
        assert new and tx.record(exp, "rtn4", 0, {"kld_mean": 9.0}, None, ENV, "m", "f", "ann") == (rid, False)
        assert tx.add_tags(exp, "bob", ["gptq", "mine"]) == ["mine"]   # its own tag is not bob's
        assert tx.experiment_with_spec(normal[1]).id == exp
    # the run id is content-addressed: the same computation from its parts
    assert rid == ids.run_id(exp, "rtn4", 0, ids.environment_key(ENV), "ann", "m", "f")
    with led.read() as q:
        e = q.experiment(exp[:9])                                    # a unique prefix is enough
        run, = q.runs(e.id)
        sets = q.run_sets(e.id)
        assert (e.id, e.tags, e.contributor, q.contributed_tags(e.id)) == (exp, ("gptq",), "ann", {"bob": ["mine"]})
        assert [a.name for a in q.arms_of(e.id)] == ["rtn4", "gptq4"]
    # snapshots stay valid after the read; the first write of a run wins
    assert run.metrics["kld_mean"] == 0.1 and run.metrics["ppl"] == float("inf")
    assert run.metrics_as_stored["ppl"] == "inf" and np.array_equal(run.per_token(), tok)
    assert [s.hostname for s in sets] == ["h1"] and run.run_set == sets[0]
    assert led.runs(exp)[0]["id"] == rid
    # a write block leaves the verdict cache stale (Ledger.record_run refreshes it); reads compute it
    assert not led.verdicts_current(exp)
    assert [(v["arm"], v["result"]) for v in led.verdicts(exp)] == [("rtn4", "baseline")]
    led.refresh_verdicts([exp])
    assert led.verdicts_current(exp)


def test_user_errors_of_the_atlas_are_user_errors(tmp_path):
    assert issubclass(LedgerError, UserError) and issubclass(RecordError, UserError)
    led = Ledger(f"sqlite:///{tmp_path / 'a.db'}")
    for call, words in ((lambda: led.resolve("cexp_nope"), "unknown experiment id 'cexp_nope'"),
                        (lambda: Ledger("not a url"), "is not a database URL")):
        with pytest.raises(UserError, match=words):
            call()
    with pytest.raises(LedgerError, match="no arm 'nope'"):
        with led.write() as tx:
            exp = tx.register(ids.normalise_spec(SPEC), "ann")
            tx.record(exp, "nope", 0, {}, None, ENV, "m", "f", "ann")


def test_the_stored_spec_is_parsed_once_into_the_one_criterion_and_seeded_predicate(tmp_path):
    from quantatlas.atlas import verdict
    from quantatlas.spec import Criterion, EvalData

    assert verdict.Criterion is Criterion                            # one class, the spec's
    led = Ledger(f"sqlite:///{tmp_path / 'a.db'}")
    exp = led.register_experiment(SPEC)
    with led.read() as q:
        spec = q.experiment(exp).spec
    assert spec.criterion == Criterion(metric="kld_mean", better="lower", min_effect=0.1, alpha=0.05)
    assert spec.criterion.lower_is_better and not Criterion(better="higher").lower_is_better
    assert spec.eval.ctx == 256 and spec.eval.tokens == 4096
    assert spec.seeded == {"rtn4": False, "gptq4": True}             # RTN is deterministic, GPTQ's draw is not
    assert spec.model is spec.model                                  # parsed once, then kept
    # a spec that no longer validates keeps its criterion and eval windows; no arm is known seeded
    old = StoredSpec(dict(spec.data, arms={"x": {"codec": {"no_such_codec": {}}}}))
    assert old.model is None and old.seeded == {}
    assert old.criterion == spec.criterion and old.eval == spec.eval
    assert StoredSpec(None).criterion == Criterion() and StoredSpec(None).eval == EvalData()


OUTSIDE_THE_STORE = ["quantatlas/atlas/io.py", "quantatlas/atlas/push.py", "quantatlas/atlas/tokens.py",
                     "quantatlas/atlas/listing.py", "quantatlas/atlas/verdict_cache.py", "quantatlas/atlas/ledger.py",
                     *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "quantatlas" / "web").glob("*.py"))]


@pytest.mark.parametrize("path", OUTSIDE_THE_STORE)
def test_no_module_outside_the_store_touches_its_sessions_or_private_members(path):
    tree = ast.parse((ROOT / path).read_text(), path)
    private = [f"{path}:{n.lineno}: {ast.unparse(n)}" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
               and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))]
    assert private == []
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and (m.startswith("sqlalchemy") or m == "quantatlas.atlas.models")}
