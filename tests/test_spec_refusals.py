"""Specs refused before any compute, naming the spec's file:line, the field and the value: duplicate
YAML keys, eval tokens beyond the data, solver options a codec cannot take, data files that are not
there. The command line exits 2 with one line and never starts the run."""
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from quantatlas.cli import app
from quantatlas.eval.windows import EvalDataError, make_eval_set
from quantatlas.reference import splits
from quantatlas.spec import SpecError, field_line, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
EVAL_TOKENS = len(splits.fixed_tokens("eval"))   # the shipped stream itself, not its manifest


@pytest.fixture
def no_compute(monkeypatch):
    """The run must not start: run_spec (model loading, tokenizing, reference logits) fails the test."""
    import quantatlas.runner

    def started(*a, **k):
        raise AssertionError("the run started: the spec should have been refused before")
    monkeypatch.setattr(quantatlas.runner, "run_spec", started)


def refused(tmp_path, text: str) -> str:
    """The one error line of `quantatlas run` on this spec (exit 2, no traceback)."""
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def loaded_error(tmp_path, text: str) -> SpecError:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    return e.value


# ---- duplicate keys -----------------------------------------------------------------------------

DUPLICATE_ARM = """\
title: an arm twice
seeds: [0]
arms:
  rtn4: {codec: {uniform: {bits: 4}}}
  gptq4: {solver: gptq, codec: {uniform: {bits: 4}}}
  rtn4: {codec: {uniform: {bits: 3}}}
"""


def test_an_arm_declared_twice_is_refused_at_its_second_line(tmp_path, no_compute):
    line = refused(tmp_path, DUPLICATE_ARM)
    assert re.search(r"spec\.yaml:6: field arms\.rtn4: duplicate key 'rtn4' \(first on line 4\)", line), line
    assert loaded_error(tmp_path, DUPLICATE_ARM).field == "arms.rtn4"
    # what YAML alone does with it: the last wins, silently (why the spec is refused)
    assert yaml.safe_load(DUPLICATE_ARM)["arms"]["rtn4"]["codec"]["uniform"]["bits"] == 3


@pytest.mark.parametrize("text,line,field", [
    # inside a flow mapping, several levels down
    ("title: t\narms:\n  a: {codec: {uniform: {bits: 4, group: 64, bits: 3}}}\n", 3, "arms.a.codec.uniform.bits"),
    # a top-level section twice, far apart
    ("title: t\ndata: {eval: {tokens: 4096}}\narms:\n  a: {codec: q8_0}\ndata: {eval: {ctx: 128}}\n", 5, "data"),
    # in a list item (an override)
    ("title: t\narms:\n  a:\n    codec: q4_k\n    overrides:\n      - match: down\n        codec: q8_0\n"
     "        codec: q6_k\n", 8, "arms.a.overrides.0.codec"),
    ("title: t\ntitle: u\narms: {a: {codec: q8_0}}\n", 2, "title"),
])
def test_duplicate_keys_anywhere_name_their_line_and_path(tmp_path, text, line, field):
    e = loaded_error(tmp_path, text)
    assert e.field == field
    assert str(e).startswith(f"{tmp_path / 'spec.yaml'}:{line}: field {field}: duplicate key"), str(e)


def test_equal_keys_in_different_mappings_and_merge_keys_are_fine(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("title: t\narms:\n  a: {codec: {uniform: {bits: 4, group: 64}}}\n"
                    "  b: {codec: {uniform: {bits: 3, group: 64}}}\n")
    assert list(load_spec(path).arms) == ["a", "b"]
    # `<<:` merges an anchor's keys and may restate one of them: that is YAML's override, not a duplicate
    path.write_text("title: t\narms:\n  a: &a {codec: q8_0, include_head: false}\n  b: {<<: *a, include_head: true}\n")
    assert load_spec(path).arms["b"].include_head is True


# ---- eval tokens beyond the data ----------------------------------------------------------------

def eval_spec(tokens, ctx=512, score="second_half", model="reference"):
    return (f"title: long eval\nmodel: {model}\ndata:\n  calib: {{samples: 4}}\n  eval:\n    ctx: {ctx}\n"
            f"    score: {score}\n    tokens: {tokens}\narms:\n  rtn4: {{codec: {{uniform: {{bits: 4}}}}}}\n")


@pytest.mark.parametrize("asked", [EVAL_TOKENS + 1, 100_000_000])
def test_reference_eval_beyond_the_shipped_stream_is_refused_at_parse_time(tmp_path, no_compute, asked):
    line = refused(tmp_path, eval_spec(asked))
    windows = EVAL_TOKENS // 512
    assert windows == 2979
    assert f"spec.yaml:8: field data.eval.tokens: {asked} tokens asked, but the reference eval stream has " \
           f"{EVAL_TOKENS} (at most {windows} windows of ctx 512, {windows * 255} tokens scored with score: " \
           f"second_half); ask for at most {EVAL_TOKENS}" in line, line
    assert loaded_error(tmp_path, eval_spec(asked)).field == "data.eval.tokens"


def test_the_scored_count_in_the_refusal_follows_score_and_ctx(tmp_path):
    msg = str(loaded_error(tmp_path, eval_spec(2_000_000, ctx=1000, score="all")))
    assert f"at most {EVAL_TOKENS // 1000} windows of ctx 1000, {EVAL_TOKENS // 1000 * 999} tokens scored" in msg


def test_every_shipped_token_may_be_asked_for_and_other_models_are_counted_later(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(eval_spec(EVAL_TOKENS))
    assert load_spec(path).data.eval.tokens == EVAL_TOKENS
    # a model with its own tokenizer: the stream's length is known once it is tokenized (make_eval_set)
    path.write_text(eval_spec(100_000_000, model="hf:org/some-llama"))
    assert load_spec(path).data.eval.tokens == 100_000_000


def test_every_shipped_spec_is_still_accepted():
    specs = sorted((ROOT / "experiments").rglob("*.yaml"))
    assert len(specs) > 20
    for p in specs:
        load_spec(p)


def test_make_eval_set_refuses_more_tokens_than_the_stream_has():
    toks = np.arange(1000) % 97
    with pytest.raises(EvalDataError) as e:
        make_eval_set(toks, 1001, 128)
    assert e.value.field == "data.eval.tokens"
    # 1000 tokens: 7 windows of 128, each scoring 128 - 1 - 64 = 63 (second half) or 127 (all)
    assert str(e.value) == ("data.eval.tokens: 1001 tokens asked, but the eval stream has 1000 (at most 7 windows "
                            "of ctx 128, 441 tokens scored with score: second_half); ask for at most 1000")
    with pytest.raises(EvalDataError, match="889 tokens scored with score: all"):
        make_eval_set(toks, 5000, 128, "all")
    assert make_eval_set(toks, 1000, 128).n_scored == 441
    assert make_eval_set(toks, 5000, 128, up_to=True).windows.shape == (7, 128)   # the old reading, on request


def test_a_text_eval_file_shorter_than_asked_is_refused_before_the_reference_logits(tmp_path, tiny_reference,
                                                                                     monkeypatch):
    from quantatlas.runner import run_spec

    monkeypatch.setenv("QUANTATLAS_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "eval.txt"
    text.write_bytes(b"x = 1\n" * 100)       # 600 bytes: BOS + 600 + EOS = 602 byte-level tokens
    spec_text = (f"title: short file\ndata:\n  eval:\n    source: {text}\n    ctx: 64\n    tokens: 4096\n"
                 "arms:\n  rtn4: {codec: {uniform: {bits: 4, group: 32}}}\n")
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text)
    spec = load_spec(path)   # the file's token count depends on the model: not known at parse time
    db = tmp_path / "ledger.db"
    with pytest.raises(EvalDataError) as e:
        run_spec(spec, db_url=f"sqlite:///{db}", loaded=tiny_reference, compress=False, log=lambda m: None)
    assert e.value.field == "data.eval.tokens" and field_line(path, e.value.field) == 6
    assert str(e.value).startswith("data.eval.tokens: 4096 tokens asked, but the eval stream has 602 (at most 9 "
                                   "windows of ctx 64, 279 tokens scored"), str(e.value)
    assert not (tmp_path / "cache" / "logits").exists() or not any((tmp_path / "cache" / "logits").iterdir())
    if db.exists():   # nothing written to the ledger: no empty experiment
        with sqlite3.connect(db) as con:
            assert con.execute("select count(*) from experiment").fetchone()[0] == 0


# ---- solver options a codec cannot take ---------------------------------------------------------

ACT_ORDER = """\
title: act order
arms:
  rtn4: {codec: {uniform: {bits: 4}}}
  gptq4:
    solver: gptq
    solver_options:
      act_order: true
      static_groups: false
    codec: {uniform: {bits: 4, group: 128}}
"""


def test_act_order_on_a_grouped_codec_without_static_groups_is_refused_at_its_line(tmp_path, no_compute):
    line = refused(tmp_path, ACT_ORDER)
    assert "spec.yaml:7: field arms.gptq4.solver_options.act_order: act_order with uniform (groups of 128 " \
           "columns) needs static_groups: true" in line, line
    assert loaded_error(tmp_path, ACT_ORDER).field == "arms.gptq4.solver_options.act_order"


def arm(**a):
    return parse_spec({"title": "t", "arms": {"a": a}}).arms["a"]


def arm_error(**a) -> SpecError:
    with pytest.raises(SpecError) as e:
        arm(**a)
    return e.value


def test_solver_codec_conflicts_are_arm_validation_errors():
    grouped = {"uniform": {"bits": 4, "group": 128}}
    e = arm_error(solver="gptaq", solver_options={"act_order": True, "static_groups": False}, codec="q4_k")
    assert e.field == "arms.a.solver_options.act_order" and "q4_k (groups of 256 columns)" in str(e)
    # what runs
    arm(solver="gptq", solver_options={"act_order": True, "static_groups": True}, codec=grouped)
    arm(solver="gptq", solver_options={"act_order": True}, codec={"uniform": {"bits": 4, "group": None}})
    arm(solver="gptq", solver_options={"block_size": 256}, codec={"trellis": {"bits": 2}})
    arm(solver="rtn", codec={"trellis": {"bits": 2}})
    # the trellis quantizes T = 256 columns together: GPTQ's default blocks of 128 cannot hold them
    e = arm_error(solver="gptq", codec={"trellis": {"bits": 2}})
    assert e.field == "arms.a.solver_options.block_size"
    assert "block_size must be a multiple of trellis's block_width 256" in str(e) and "got 128" in str(e)
    # the codecs an arm's solver is handed besides its own: an override's, a gguf mixture's, a candidate's
    e = arm_error(solver="gptq", solver_options={"act_order": True, "static_groups": False},
                  codec={"uniform": {"bits": 4, "group": None}}, overrides=[{"match": "down", "codec": "q8_0"}])
    assert e.field == "arms.a.solver_options.act_order" and "(the codec at overrides.0.codec)" in str(e)
    e = arm_error(solver="gptq", solver_options={"act_order": True, "static_groups": False}, codec={"gguf": "Q4_K_M"})
    assert e.field == "arms.a.solver_options.act_order"
    e = arm_error(solver="gptq", solver_options={"act_order": True, "static_groups": False},
                  codec={"uniform": {"bits": 4, "group": None}}, allocate={"candidates": ["q6_k"], "target": {"bits_per_weight": 5.0}})
    assert "(the codec at allocate.candidates.0)" in str(e)
    # an override with a solver of its own runs it with that solver's defaults
    e = arm_error(solver="rtn", codec={"uniform": {"bits": 4, "group": None}},
                  overrides=[{"match": "down", "codec": {"trellis": {"bits": 2}}, "solver": "gptq"}])
    assert e.field == "arms.a.overrides.0.solver" and "gptq runs with its default options" in str(e)


def test_the_refusal_matches_what_the_solver_would_raise_at_run_time():
    import torch

    from quantatlas.quant.codecs import make_codec
    from quantatlas.quant.solvers.gptq import gptq

    W, H = torch.randn(8, 256, dtype=torch.float64), torch.eye(256, dtype=torch.float64)
    with pytest.raises(ValueError, match="static_groups"):
        gptq(W, H, make_codec("uniform", {"bits": 4, "group": 128}), act_order=True)
    with pytest.raises(ValueError, match="block_size must be a positive multiple"):
        gptq(W, H, make_codec("trellis", {"bits": 2}))


def test_the_conflict_is_refused_without_torch_too():
    """The atlas server (no torch) refuses such a spec as well, where the codec builds without torch."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from quantatlas.spec import SpecError, parse_spec\n"
            "try:\n    parse_spec({'title': 'x', 'arms': {'a': {'solver': 'gptq', 'solver_options': "
            "{'act_order': True, 'static_groups': False}, 'codec': {'uniform': {'bits': 4}}}}})\n"
            "except SpecError as e:\n    print(e.field)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "arms.a.solver_options.act_order"


# ---- data files that are not there --------------------------------------------------------------

MISSING = """\
title: missing data
data:
  calib: {samples: 4, source: CALIB}
  eval:
    source: EVAL
arms:
  rtn4: {codec: {uniform: {bits: 4}}}
"""


def test_a_missing_eval_file_is_refused_at_its_line(tmp_path, no_compute):
    line = refused(tmp_path, MISSING.replace("CALIB", "stdlib").replace("EVAL", "path/that/does/not/exist.txt"))
    assert "spec.yaml:5: field data.eval.source: no such file: 'path/that/does/not/exist.txt'" in line, line


def test_a_missing_calibration_file_or_a_folder_is_refused(tmp_path, no_compute):
    e = loaded_error(tmp_path, MISSING.replace("CALIB", str(tmp_path / "nope.txt")).replace("EVAL", "reference"))
    assert e.field == "data.calib.source" and str(e).startswith(f"{tmp_path / 'spec.yaml'}:3: field data.calib.source")
    e = loaded_error(tmp_path, MISSING.replace("CALIB", "stdlib").replace("EVAL", str(tmp_path)))
    assert e.field == "data.eval.source" and "not a file" in str(e)


def test_sources_that_are_not_paths_and_files_that_exist_pass(tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("x = 1\n")
    path = tmp_path / "spec.yaml"
    for calib, ev in (("stdlib", "reference"), ("hf:org/corpus", "hf:org/corpus:wikitext"), (str(text), str(text))):
        path.write_text(MISSING.replace("CALIB", calib).replace("EVAL", ev))
        assert load_spec(path).data.eval.source == ev


SPINQUANT_WINDOWS = """\
title: spinquant asks for more windows than the draw
data:
  calib: {samples: 16, seq_len: 512}
arms:
  quarot: {codec: {uniform: {bits: 4}}, transforms: [{hadamard: {}}]}
  spin:
    codec: {uniform: {bits: 4}}
    transforms:
      - spinquant: {samples: 32}
  spin_own: {codec: {uniform: {bits: 4}}, calib: {samples: 64, seq_len: 128}, transforms: [{spinquant: {samples: 32}}]}
"""


def test_spinquant_windows_beyond_the_calibration_draw_are_refused_at_their_line(tmp_path, no_compute):
    """SpinQuant trains on its `samples` windows of `seq_len` from the arm's calibration draw; asking for
    more used to stop the run after the reference logits (and after other arms)."""
    line = refused(tmp_path, SPINQUANT_WINDOWS)
    assert "spec.yaml:9: field arms.spin.transforms.0.spinquant.samples: 32 asked, more than the 16 of the arm's " \
           "calibration draw (data.calib.samples) (value: 32)" in line, line
    fixed = SPINQUANT_WINDOWS.replace("samples: 16", "samples: 32")
    e = loaded_error(tmp_path, fixed)           # the arm's own draw: 64 windows, but of 128 tokens (256 asked)
    assert e.field == "arms.spin_own.transforms.0.spinquant.seq_len"
    assert "256 asked, more than the 128 of the arm's calibration draw (arms.spin_own.calib.seq_len)" in str(e)
    path = tmp_path / "spec.yaml"
    path.write_text(fixed.replace("seq_len: 128", "seq_len: 256"))
    assert load_spec(path).arms["spin_own"].transforms[0].samples == 32


@pytest.mark.parametrize("a, field, words", [
    ({"transforms": [{"equalize": {"alpha": 1e6}}]}, "arms.a.transforms.0.equalize.alpha", "less than or equal to 1"),
    ({"solver": "gptaq", "solver_options": {"gptaq_alpha": -1}}, "arms.a.solver_options.gptaq_alpha",
     "greater than or equal to 0"),
])
def test_exponents_and_factors_that_only_overflow_are_refused(a, field, words):
    """equalize's s = H_ii^alpha with alpha 10^6 overflowed into a NaN Hessian mid-run; a negative gptaq_alpha
    turns GPTAQ's correction around. Both are refused with the spec."""
    e = arm_error(**a)
    assert e.field == field and words in str(e)
    arm(transforms=[{"equalize": {"alpha": 1.0}}], solver="gptaq", solver_options={"gptaq_alpha": 0.25})


@pytest.mark.parametrize("patch, field, words", [
    ({"seeds": [-1]}, "seeds", "a seed must be an integer from 0 to 2^32 - 1, got -1"),
    ({"seeds": [0, 2 ** 32]}, "seeds", "got 4294967296"),
    ({"seeds": [0, 1, 0]}, "seeds", "seed 0 named more than once in [0, 1, 0]: each seed runs once"),
    ({"seeds": list(range(1001))}, "seeds", "1001 seeds, more than 1000"),
    ({"data": {"calib": {"samples": 10 ** 7, "seq_len": 512}}}, "data.calib.samples",
     "10000000 windows of 512 tokens are 5,120,000,000 tokens, more than the 134,217,728 a calibration draw may hold"),
    ({"arms": {"a": {"solver": "gptq", "codec": {"uniform": {"bits": 4}}, "calib": {"samples": 2 ** 20,
                                                                                       "seq_len": 2048}}}},
     "arms.a.calib.samples", "more than the 134,217,728"),
])
def test_seeds_and_calibration_draws_that_cannot_run_are_refused(patch, field, words):
    """A negative seed stopped the run at its first random draw (after loading the model), a repeated seed was
    silently run once under an id of its own, and 10^7 calibration windows died allocating 38 GiB."""
    d = {"title": "t", "arms": {"a": {"codec": {"uniform": {"bits": 4}}}}, **patch}
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert e.value.field == field and words in str(e.value)
    parse_spec({**d, "seeds": [0, 1, 2 ** 32 - 1], "data": {"calib": {"samples": 2 ** 14, "seq_len": 2 ** 13}},
                "arms": {"a": {"codec": {"uniform": {"bits": 4}}}}})


def test_the_aqlm_solver_is_refused_a_codec_it_cannot_run_with_the_spec():
    """solver: aqlm with a q8_0 override (the override inherits the arm's solver) stopped the run at that
    matrix; with a llama.cpp mixture, at the first one."""
    aqlm = {"aqlm": {"codebooks": 2, "code_bits": 8}}
    e = arm_error(solver="aqlm", codec=aqlm, overrides=[{"match": "v", "codec": "q8_0"}])
    assert e.field == "arms.a.solver"
    assert "solver aqlm quantizes with the aqlm codec only; overrides.0.codec is q8_0 (give that override a " \
           "solver of its own, e.g. solver: gptq)" in str(e)
    e = arm_error(solver="aqlm", codec={"gguf": "Q4_K_M"})
    assert e.field == "arms.a.solver" and "codec is gguf (use solver: gptq or rtn for gguf)" in str(e)
    arm(solver="aqlm", codec=aqlm, overrides=[{"match": "v", "codec": "q8_0", "solver": "gptq"}])


def test_awq_without_a_codec_to_search_for_is_refused_with_the_spec():
    """AWQ searches its scales for its own codec, else the arm's; with a llama.cpp mixture (or no codec) there is
    none, which used to stop the run at the transform, after the reference logits."""
    for codec, what in (({"gguf": "Q4_K_M"}, "a llama.cpp mixture (codec: gguf)"), (None, "none")):
        e = arm_error(codec=codec, transforms=[{"awq": {}}])
        assert e.field == "arms.a.transforms"
        assert f"transforms.0.awq.codec: AWQ searches its scales for one codec, and the arm's codec is {what}: " \
               "set the awq transform's own codec (e.g. q4_k)" in str(e)
    arm(codec={"gguf": "Q4_K_M"}, transforms=[{"awq": {"codec": "q4_k"}}])
    arm(codec={"uniform": {"bits": 4}}, transforms=[{"awq": {}}])
