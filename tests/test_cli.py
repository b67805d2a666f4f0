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
                      r"spec.yaml:2: field model: model 'no_such_model': not 'reference'"),
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
