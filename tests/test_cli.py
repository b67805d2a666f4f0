"""Bad input: one line naming file, field and value; exit code 2; never a traceback."""
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from quantatlas.cli import app

BASE = """\
title: t
model: reference
data: {eval: {tokens: 4096, ctx: 256}}
arms:
  a: {codec: {uniform: {bits: 4, group: 128}}}
"""

CASES = {
    "missing": (None, r"nope.yaml: spec file not found"),
    "malformed": (BASE.replace("arms:", "arms: [").replace("  a:", "a:"), r"spec.yaml:\d+: malformed YAML"),
    "unknown model": (BASE.replace("model: reference", "model: no_such_model"),
                      r"spec.yaml:2: field model: model 'no_such_model': not an embedded model \(reference, "),
    "unknown codec": (BASE.replace("uniform:", "uniformm:"),
                      r"spec.yaml:5: field arms.a.codec: unknown codec 'uniformm'; known: .*uniform"),
    "bits out of range": (BASE.replace("bits: 4", "bits: 9"),
                          r"spec.yaml:5: field arms.a.codec.uniform.bits: Input should be less than or equal to 8 "
                          r"\(value: 9\)"),
    "eval too short": (BASE.replace("tokens: 4096, ctx: 256", "tokens: 100, ctx: 256"),
                       r"spec.yaml:3: data.eval: 100 tokens available is shorter than one window of ctx=256"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, tmp_path):
    text, pattern = CASES[case]
    path = tmp_path / ("nope.yaml" if text is None else "spec.yaml")
    if text is not None:
        path.write_text(text)
    result = CliRunner().invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


def test_console_script_exit_code(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(BASE.replace("bits: 4", "bits: 1"))
    r = subprocess.run([sys.executable, "-m", "quantatlas.cli", "run", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "field arms.a.codec.uniform.bits: Input should be greater than or equal to 2 (value: 1)" in r.stderr


def test_the_line_comes_from_the_errors_field_not_its_message(tmp_path, monkeypatch):
    """A UserError names its spec field in `field`; the CLI finds that field's line (and adds
    `field ...:` unless the message starts with it). A plain ValueError's message is not parsed."""
    import quantatlas.runner
    from quantatlas.errors import UserError

    path = tmp_path / "spec.yaml"
    path.write_text(BASE)
    raised = {}
    monkeypatch.setattr(quantatlas.runner, "run_spec", lambda *a, **k: (_ for _ in ()).throw(raised["e"]))
    for error, want in [
        (UserError("the codec is wrong", "arms.a.codec"), f"error: {path}:5: field arms.a.codec: the codec is wrong"),
        (UserError("data.eval: too short", "data.eval"), f"error: {path}:3: data.eval: too short"),
        (UserError("arms.a: nothing here", None), f"error: {path}: arms.a: nothing here"),
        (ValueError("arms.a: a plain ValueError"), f"error: {path}: arms.a: a plain ValueError"),
    ]:
        raised["e"] = error
        result = CliRunner().invoke(app, ["run", str(path), "--quiet"])
        assert result.exit_code == 2 and result.stderr.strip() == want, result.stderr


def test_tables_print_names_as_written():
    from quantatlas.tables import plain_table, render

    t = plain_table(("arm", "left"), ("KLD", "right"))
    t.add_row("[bold]x[/bold]", "0.5")
    t.add_row("w", "0.25")
    # columns as wide as their widest cell, two spaces apart; numbers right-aligned; no markup read
    assert render(t).splitlines() == ["arm" + " " * 11 + "  " + " KLD",
                                      "[bold]x[/bold]" + "  " + " 0.5",
                                      "w" + " " * 13 + "  " + "0.25"]
