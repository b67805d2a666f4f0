"""The reference corpus's fixed splits: shipped data, manifest, and an eval fingerprint that is
the same on every Python."""
import glob
import hashlib
import json
import lzma
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from quantatlas.eval.windows import make_eval_set
from quantatlas.models.load import LoadedModel, ModelLoadError
from quantatlas.quant.quantize import calibration_tokens
from quantatlas.reference import corpus, data, splits
from quantatlas.spec import EvalData

# make_eval_set(<model: reference, data source stdlib, split eval>, 65536, 512): computed once
# from the shipped data; it is also what Python 3.11.7's live stdlib gave before the data shipped.
DEFAULT_EVAL_FINGERPRINT = "23f0c1ec3cf24524"
ROOT = Path(__file__).resolve().parent.parent


def _byte_model() -> LoadedModel:
    return LoadedModel(torch.nn.Identity(), "reference", "hash", None)


def test_shipped_data_matches_manifest_and_is_small():
    man = json.loads(data.MANIFEST.read_text())
    assert set(man["files"]) == set(data.NAMES)
    total = 0
    for name, e in man["files"].items():
        comp = (data.DATA_DIR / e["file"]).read_bytes()
        assert len(comp) == e["compressed_bytes"]
        raw = lzma.decompress(comp)
        assert hashlib.sha256(raw).hexdigest() == e["sha256"] and len(raw) == 2 * e["tokens"]
        toks = np.frombuffer(raw, "<u2")
        # every file is BOS + bytes + EOS
        assert toks[0] == corpus.BOS and toks[-1] == corpus.EOS and toks.max() < corpus.VOCAB_SIZE
        assert (toks == corpus.BOS).sum() == (toks == corpus.EOS).sum() == e["n_files"] == len(e["sources"])
        total += len(comp)
    assert total < 2 * 2 ** 20
    assert data.check() == {n: man["files"][n]["tokens"] for n in data.NAMES}
    # the three splits hold different files: calib comes from train, which eval and validation never touch
    srcs = {n: set(man["files"][n]["sources"]) for n in data.NAMES}
    assert not (srcs["eval"] & srcs["validation"]) and not (srcs["calib"] & (srcs["eval"] | srcs["validation"]))
    assert all(corpus.split_of(r) == "train" for r in srcs["calib"])
    assert all(corpus.split_of(r) == "eval" for r in srcs["eval"])


def test_fixed_splits_cover_what_specs_and_the_card_ask():
    need_eval, need_calib = EvalData().tokens, 0
    for f in glob.glob(str(ROOT / "experiments" / "**" / "*.yaml"), recursive=True):
        spec = yaml.safe_load(Path(f).read_text()) or {}
        d = spec.get("data") or {}
        ev = d.get("eval") or {}
        need_eval = max(need_eval, ev.get("tokens", 0))
        for c in [d.get("calib") or {}] + [a.get("calib") or {} for a in (spec.get("arms") or {}).values()
                                          if isinstance(a, dict)]:
            need_calib = max(need_calib, c.get("samples", 0) * c.get("seq_len", 0))
    assert need_eval >= 65536 and need_calib >= 64 * 512      # the scan found the specs
    assert len(splits.fixed_tokens("eval")) >= 4 * max(need_eval, 131072)
    assert len(splits.fixed_tokens("calib")) >= 10 * need_calib
    card = json.loads((ROOT / "quantatlas/reference/checkpoint/card.json").read_text())
    assert len(splits.fixed_tokens("validation")) > card["train"]["val_tokens"] + 1


def test_default_eval_fingerprint_is_a_fixed_constant():
    ev = EvalData()
    assert (ev.source, ev.tokens, ev.ctx, ev.score) == ("stdlib", 65536, 512, "second_half")
    es = make_eval_set(_byte_model().text_tokens(ev.source, "eval"), ev.tokens, ev.ctx, ev.score)
    assert es.fingerprint == DEFAULT_EVAL_FINGERPRINT
    assert es.n_scored == 128 * 255


@pytest.mark.parametrize("n,ctx,score", [(65536, 512, "second_half"), (131072, 512, "all"),
                                         (32768, 256, "second_half"), (1000, 128, "all"), (10 ** 9, 1024, "all")])
def test_pure_python_fingerprint_is_make_eval_set_s(n, ctx, score):
    es = make_eval_set(splits.fixed_tokens("eval"), n, ctx, score, up_to=True)  # 10 ** 9: as many windows as there are
    assert data.fingerprint("eval", n, ctx, score) == es.fingerprint
    if (n, ctx, score) != (65536, 512, "second_half"):
        assert es.fingerprint != DEFAULT_EVAL_FINGERPRINT


def _other_python(minor: int) -> str | None:
    cands = sorted(glob.glob(str(Path.home() / f".pyenv/versions/3.{minor}.*/bin/python3.{minor}")))
    cands += [p for p in (shutil.which(f"python3.{minor}"), f"/usr/bin/python3.{minor}") if p]
    for exe in cands:
        try:
            out = subprocess.run([exe, "-I", "-c", "import sys, lzma; print(sys.version_info[1])"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == str(minor):
            return exe
    return None


_PROBE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("qa_refdata", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
print(m.fingerprint("eval", 65536, 512), "numpy" in sys.modules or "torch" in sys.modules)
"""


@pytest.mark.parametrize("minor", [m for m in range(10, 15) if m != sys.version_info[1]])
def test_same_fingerprint_on_another_python(minor):
    exe = _other_python(minor)
    if exe is None:
        pytest.skip(f"no Python 3.{minor} on this machine")
    out = subprocess.run([exe, "-I", "-c", _PROBE, data.__file__], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [DEFAULT_EVAL_FINGERPRINT, "False"]


def test_stdlib_source_reads_the_shipped_data_not_the_interpreter(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the live standard library was read")

    monkeypatch.setattr(corpus, "stdlib_root", boom)
    monkeypatch.setattr(corpus, "corpus_files", boom)
    monkeypatch.setattr(corpus, "stdlib_tokens", boom)
    lm = _byte_model()
    ev = lm.text_tokens("stdlib", "eval")
    assert np.array_equal(ev, lm.text_tokens("reference", "eval")) and len(ev) == 1525561
    calib = lm.text_tokens("stdlib", "train")                 # calibration draws: the shipped sample of train
    assert np.array_equal(calib, data.tokens("calib")) and not np.array_equal(calib[:4096], ev[:4096])
    assert np.array_equal(lm.text_tokens("stdlib", "validation"), splits.corpus_tokens("validation"))
    draw = calibration_tokens(calib, 128, 1024, seed=0)
    assert draw.shape == (128, 1024) and int(draw.max()) < corpus.VOCAB_SIZE
    assert not torch.equal(draw, calibration_tokens(calib, 128, 1024, seed=1))
    with pytest.raises(ModelLoadError, match="unknown split 'test'"):
        lm.text_tokens("stdlib", "test")


def test_a_tokenizer_model_gets_the_shipped_documents():
    class Tok:  # one id per character, as a Hugging Face tokenizer is called
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) + 1 for c in text]}

    lm = LoadedModel(torch.nn.Identity(), "folder", "hash", Tok())
    toks = lm.text_tokens("stdlib", "eval")
    docs = data.documents("eval")
    assert len(docs) == json.loads(data.MANIFEST.read_text())["files"]["eval"]["n_files"]
    assert (toks == 0).sum() == len(docs)
    first = docs[0].decode()
    assert first.startswith("__all__") and toks[len(first)] == 0
    assert "".join(chr(t - 1) for t in toks[:len(first)]) == first


def test_missing_or_altered_data_is_an_error(tmp_path, monkeypatch):
    man = json.loads(data.MANIFEST.read_text())
    (tmp_path / "eval.u16.xz").write_bytes(lzma.compress(np.array([256, 65, 257], "<u2").tobytes()))
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    monkeypatch.setattr(data, "MANIFEST", tmp_path / "manifest.json")
    for f in (data.manifest, data.stream_bytes, data._np_tokens):
        f.cache_clear()
    try:
        with pytest.raises(data.FixedDataError, match="manifest.json is missing"):
            data.tokens("eval")
        (tmp_path / "manifest.json").write_text(json.dumps(man))
        data.manifest.cache_clear()
        with pytest.raises(data.FixedDataError, match="does not match the sha256"):
            data.tokens("eval")
        with pytest.raises(data.FixedDataError, match="validation.u16.xz is missing"):
            data.tokens("validation")
    finally:
        for f in (data.manifest, data.stream_bytes, data._np_tokens):
            f.cache_clear()


def test_package_data_ships_the_fixed_splits():
    tomllib = pytest.importorskip("tomllib")
    pkg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    base = ROOT / "quantatlas" / "reference"
    shipped = {p for pat in pkg["quantatlas.reference"] for p in base.glob(pat) if p.is_file()}
    assert {data.MANIFEST} | {data.DATA_DIR / e["file"] for e in data.manifest()["files"].values()} <= shipped


@pytest.mark.skipif(platform.python_version() != data.manifest()["built_from"].split()[1],
                    reason="the shipped data was cut from another Python's standard library")
def test_build_reproduces_the_shipped_data():
    streams = data.build_streams()
    for name, (raw, rel) in streams.items():
        e = data.manifest()["files"][name]
        assert hashlib.sha256(raw).hexdigest() == e["sha256"] and rel == e["sources"]
    # on the Python it was cut from, the fixed splits are the live ones
    assert np.array_equal(corpus.stdlib_tokens("eval"), splits.fixed_tokens("eval"))
