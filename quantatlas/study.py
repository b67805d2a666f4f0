"""Run a study: a spec that names several models (`models: [reference, reference-llama, reference-moe]`)
runs as one experiment per model, each exactly the spec with `model: <name>` (`Spec.for_model`: the id,
verdicts, reproductions and resume that spelling has). The study is their family (atlas/ids.py
family_hash); the atlas judges it across architectures (atlas/studies.py).

    doc = run_study(spec, json_path, ...)     # a one-model spec: run_spec's document, unchanged

The results of a study (`--json PATH`):

    PATH                          {"study": family hash, "title", "hypothesis", "models": [names],
                                   "experiments": {model: id}, "results": {model: that model's document},
                                   "files": {model: its file}, "study_verdicts": {...} | None, "seconds"}
    PATH's stem.<model>.json      each model's document, exactly what `quantatlas run --json` writes for
                                  the spec with `model: <name>`: what a re-run resumes that model from
                                  (with the ledger's runs, as for any spec)

`study_verdicts` is each model's verdict on the hypothesis and the study line over them (atlas/studies.py),
read from the ledger (None without one). The models run one after the other; every name is checked before
the first runs (a model refused only when it loads, by its layout or an arm it cannot take, stops the study
there: the models before it are stored, and a re-run resumes them).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from quantatlas import runner
from quantatlas.spec import Spec, check_models, parse_spec, resolve_inputs


def model_files(json_path: Path, models: list[str]) -> dict[str, Path]:
    """Where a study writes each model's document beside its own: `<stem>.<model>.json`, the name made safe
    for a file (a hub id or a folder path keeps its letters, digits, `-` and `.`); two names that come out
    the same (`a/b`, `a_b`) are told apart by their position (`<stem>.2-a_b.json`)."""
    out, taken = {}, set()
    for i, model in enumerate(models, 1):
        safe = re.sub(r"[^A-Za-z0-9.\-]+", "_", model).strip("._") or "model"
        if safe in taken:
            safe = f"{i}-{safe}"
        taken.add(safe)
        out[model] = json_path.with_name(f"{json_path.stem}.{safe}{json_path.suffix or '.json'}")
    return out


def run_study(spec: Spec | dict, json_path: str | Path | None = None, *, ray: str | None = None,
              ray_options: dict | None = None, **common) -> dict:
    """Run `spec` on each of its models (`runner.run_spec`, or `sweep.run_spec_ray` when `ray` is given: None runs
    serially, "local" a local Ray, else a cluster address) and return the study document (module docstring);
    a one-model spec returns its own document, as `run_spec` does. `common`: run_spec's keyword arguments."""
    if isinstance(spec, dict):
        spec = parse_spec(spec)
    if not spec.is_study:
        return _run_one(spec, json_path, ray, ray_options, common)
    check_models(spec)                          # every name, before any model runs
    check_embedded_arms(spec)                   # and every arm on every embedded model
    from quantatlas.atlas.ids import family_hash

    t0 = time.time()
    json_path = Path(json_path) if json_path else None
    per_model = {name: spec.for_model(name) for name in spec.models}
    families = {family_hash(s.identity()) for s in per_model.values()}
    assert len(families) == 1, "a study's models share one family hash"
    doc = {"title": spec.title, "hypothesis": spec.hypothesis, "study": families.pop(), "models": list(spec.models),
           "experiments": {}, "results": {}, "files": {}, "study_verdicts": None}
    files = model_files(json_path, spec.models) if json_path else {}
    for name, one in per_model.items():
        path = files.get(name)
        result = _run_one(one, path, ray, ray_options, common)
        doc["results"][name] = result
        doc["experiments"][name] = result.get("experiment_id")
        if path is not None:
            doc["files"][name] = str(path)
            _save(json_path, doc)                 # the study so far: each finished model's document
    if common.get("ledger", True):
        doc["study_verdicts"] = study_verdicts(doc, common.get("db_url"))
    doc["seconds"] = round(time.time() - t0, 2)
    if json_path:
        _save(json_path, doc)
    return doc


def check_embedded_arms(spec: Spec) -> None:
    """Each embedded model of the study (reference, reference-llama, reference-moe: on disk, a second to load) is
    loaded and every arm checked on it as its run will check it (the layout, each step's `check_model`: an
    override that hits nothing, a transform the architecture cannot take), so an arm refused on the last model
    stops the study before the first model has spent anything. Other models are checked when their run loads
    them (a hub model would be downloaded twice)."""
    from quantatlas.models.layout import layout
    from quantatlas.models.load import load_model
    from quantatlas.quant.pipeline import check_backend
    from quantatlas.reference.model import is_reference_model

    for name in spec.models:
        if not is_reference_model(name):
            continue
        one = resolve_inputs(spec.for_model(name), Path.cwd(), require=True)   # as the run resolves artifact arms
        lm = load_model(name, device="cpu")
        layout(lm.model).check()
        for arm_name, arm in one.arms.items():
            check_backend(lm, arm, f"arms.{arm_name}")


def _save(path: Path, doc: dict) -> None:
    """Write the study document whole or not at all (a killed run leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def _run_one(spec: Spec, json_path, ray: str | None, ray_options: dict | None, common: dict) -> dict:
    if ray is None:
        return runner.run_spec(spec, json_path, **common)   # looked up when called: a test may stand in for it
    from quantatlas.sweep import run_spec_ray

    return run_spec_ray(spec, json_path, address=None if ray == "local" else ray, **(ray_options or {}), **common)


def study_verdicts(doc: dict, db_url: str | None) -> dict | None:
    """The study's line and each model's verdict on the hypothesis, from the ledger (atlas/studies.py). Each
    model's `verdicts` in `doc` are read again: a model run before the others was judged without them (its
    texts' "Holds on k of n models")."""
    first = next((e for e in doc["experiments"].values() if e), None)
    if first is None:
        return None
    from quantatlas.atlas.ledger import Ledger
    from quantatlas.atlas.records import plain
    from quantatlas.atlas.studies import study

    with Ledger(db_url) as led:
        for name, exp_id in doc["experiments"].items():
            if exp_id and "verdicts" in doc["results"][name]:
                doc["results"][name]["verdicts"] = led.verdicts(exp_id)
        with led.read() as q:
            return plain(study(q, led.verdict_cache, q.experiment(first)))
