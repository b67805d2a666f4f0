"""Spec validation: errors name the file, line, field and value."""
import pytest

from quantatlas.spec import SpecError, load_spec, parse_spec

GOOD = """\
title: t
hypothesis: h
model: reference
data: {eval: {tokens: 4096, ctx: 256}}
seeds: [0, 1]
control: a
arms:
  a: {codec: {uniform: {bits: 4, group: 128}}}
  b: {solver: gptq, codec: q8_0}
"""


def write(tmp_path, text):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_good_spec_loads(tmp_path):
    s = load_spec(write(tmp_path, GOOD))
    assert s.arms["b"].codec == {"q8_0": {}}
    assert s.arms["a"].codec == {"uniform": {"bits": 4, "group": 128}}
    assert s.data.eval.ctx == 256 and s.data.calib.samples == 64 and s.seeds == [0, 1]


def test_hash_ignores_free_text_but_not_arms(tmp_path):
    a = load_spec(write(tmp_path, GOOD))
    b = load_spec(write(tmp_path, GOOD.replace("title: t", "title: other").replace("hypothesis: h", "hypothesis: x")))
    c = load_spec(write(tmp_path, GOOD.replace("bits: 4", "bits: 3")))
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()


@pytest.mark.parametrize("text,expect", [
    (GOOD.replace("seeds: [0, 1]", "seeds: [0, 1"), r"spec.yaml:\d+: malformed YAML"),
    (GOOD.replace("control: a", "control: zz"), r"spec.yaml:6: field control: control 'zz' is not one of"),
    (GOOD.replace("  b: {solver", "  b: {solvr"), r"spec.yaml:9: field arms.b.solvr: Extra inputs.*'gptq'"),
    (GOOD.replace("ctx: 256", "ctx: many"), r"spec.yaml:4: field data.eval.ctx: .*integer.*'many'"),
    ("- a\n- b\n", r"spec.yaml: a spec must be a YAML mapping"),
    (GOOD.replace("title: t\n", ""), r"field title: Field required"),
])
def test_bad_specs_name_line_field_value(tmp_path, text, expect):
    with pytest.raises(SpecError, match=expect):
        load_spec(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_parse_dict_round_trip():
    s = parse_spec({"title": "x", "arms": {"fp16": {"codec": None}}})
    assert parse_spec(s.to_dict()).spec_hash() == s.spec_hash()
