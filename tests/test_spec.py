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
    assert s.arms["b"].codec.to_spec() == {"q8_0": {}} and s.arms["b"].solver_options.name == "gptq"
    # typed: defaults filled in, the stored spec writes them out
    assert s.arms["a"].codec.to_spec() == {"uniform": {"bits": 4, "group": 128, "symmetric": True, "clip": "minmax",
                                                       "scale": "signed_max"}}
    assert s.to_dict()["arms"]["b"]["solver_options"]["damp"] == 0.01
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
    # typed configs: the field inside the config, its line and value
    (GOOD.replace("bits: 4", "bits: 99"),
     r"spec.yaml:8: field arms.a.codec.uniform.bits: Input should be less than or equal to 8 \(value: 99\)"),
    (GOOD.replace("codec: q8_0", "codec: q9_0"), r"spec.yaml:9: field arms.b.codec: unknown codec 'q9_0'; known: "),
    (GOOD.replace("solver: gptq", "solver: gptx"), r"spec.yaml:9: field arms.b.solver: unknown solver 'gptx'"),
    (GOOD.replace("solver: gptq,", "solver: gptq, solver_options: {damp: -1},"),
     r"spec.yaml:9: field arms.b.solver_options.damp: Input should be greater than or equal to 0 \(value: -1\)"),
    (GOOD.replace("solver: gptq,", "solver: rtn, solver_options: {damp: 0.1},"),
     r"field arms.b.solver_options.damp: Extra inputs are not permitted"),
    (GOOD.replace("  b: {solver", "  b: {transforms: [{hadamard: {block: 0}}], solver"),
     r"spec.yaml:9: field arms.b.transforms.0.hadamard.block: Input should be greater than or equal to 1"),
    (GOOD.replace("  b: {solver", "  b: {kv: {k: {uniform: {bits: 1}}}, solver"),
     r"field arms.b.kv.k.uniform.bits: Input should be greater than or equal to 2 \(value: 1\)"),
    (GOOD.replace("  b: {solver", "  b: {overrides: [{match: k, codec: {turbo: {bits: 2, group: 90}}}], solver"),
     r"field arms.b.overrides.0.codec.turbo.group: Value error, needs a Hadamard|field arms.b.overrides.0.codec.turbo"
     r".group: needs a Hadamard"),
    (GOOD.replace("control: a", "control: a\nprimary: q"), r"field primary: primary 'q' is not one of"),
])
def test_bad_specs_name_line_field_value(tmp_path, text, expect):
    with pytest.raises(SpecError, match=expect):
        load_spec(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_spec_errors_carry_the_field_they_name(tmp_path):
    from quantatlas.errors import UserError

    for text, field in [(GOOD.replace("bits: 4", "bits: 99"), "arms.a.codec.uniform.bits"),
                        (GOOD.replace("control: a", "control: zz"), "control"),
                        (GOOD.replace("seeds: [0, 1]", "seeds: [0, 1"), None)]:
        with pytest.raises(SpecError) as e:
            load_spec(write(tmp_path, text))
        assert isinstance(e.value, UserError) and e.value.field == field, (str(e.value), e.value.field)
        assert field is None or f"field {field}: " in str(e.value)


def test_parse_dict_round_trip():
    s = parse_spec({"title": "x", "arms": {"fp16": {"codec": None}}})
    assert parse_spec(s.to_dict()).spec_hash() == s.spec_hash()


def test_writing_defaults_out_keeps_the_experiment_id():
    base = {"title": "x", "control": "a", "arms": {
        "a": {"codec": {"uniform": {"bits": 4}}},
        "b": {"solver": "gptq", "codec": "q4_k", "transforms": [{"hadamard": {}}],
              "overrides": [{"match": "k", "codec": {"turbo": {"bits": 3}}}], "kv": {"k": "q8_0"}}}}
    spelled = {"title": "x", "control": "a", "seeds": [0], "model": "reference", "arms": {
        "a": {"solver": "rtn", "codec": {"uniform": {"bits": 4, "group": 128, "symmetric": True, "clip": "minmax",
                                                     "scale": "signed_max"}}},
        "b": {"solver": "gptq", "solver_options": {"block_size": 128, "damp": 0.01, "act_order": True},
              "codec": {"q4_k": {}}, "transforms": [{"hadamard": {"residual": True, "online": ["down"], "block": None}}],
              "overrides": [{"match": "k", "codec": {"turbo": {"bits": 3, "group": 128, "seed": 0}}}],
              "kv": {"k": {"q8_0": {}}, "v": None}, "propagation": "layer"}}}
    assert parse_spec(base).spec_hash() == parse_spec(spelled).spec_hash()
    # a value that differs from the default is part of the experiment
    spelled["arms"]["b"]["solver_options"]["damp"] = 0.1
    assert parse_spec(base).spec_hash() != parse_spec(spelled).spec_hash()
    # the stored spec is the full one, and it parses back to the same experiment
    full = parse_spec(base).to_dict()
    assert full["arms"]["a"]["codec"]["uniform"]["group"] == 128
    assert parse_spec(full).spec_hash() == parse_spec(base).spec_hash()


def test_seeded_arms_follow_their_configs():
    def arm(**kw):
        return parse_spec({"title": "x", "arms": {"a": kw}}).arms["a"]
    assert not arm(codec={"uniform": {"bits": 4}}).seeded and not arm(codec="q4_k").seeded
    assert arm(solver="gptq", codec="q4_k").seeded and arm(codec={"turbo": {"bits": 3}}).seeded
    assert arm(codec="q4_k", transforms=["hadamard"]).seeded
    assert arm(codec={"gguf": {"ftype": "Q4_K_M", "imatrix": True}}).seeded and not arm(codec={"gguf": "Q4_K_M"}).seeded
    assert not arm(solver="gptq", codec="q4_k", deterministic=True).seeded


def test_specs_validate_without_torch():
    """The atlas server validates pushed specs with the same configs, and has no torch."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from quantatlas.spec import SpecError, parse_spec\n"
            "s = parse_spec({'title': 'x', 'arms': {'a': {'solver': 'gptq', 'codec': {'turbo': {'bits': 3}},"
            " 'transforms': [{'awq': {'codec': 'q4_k'}}]}}})\n"
            "assert s.arms['a'].seeded\n"
            "try:\n    parse_spec({'title': 'x', 'arms': {'a': {'codec': {'uniform': {'bits': 99}}}}})\n"
            "except SpecError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "field arms.a.codec.uniform.bits: Input should be less than or equal to 8 (value: 99)" in out.stdout
