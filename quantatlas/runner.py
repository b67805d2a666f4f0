"""Run a spec: arms x seeds on one model, each measured KLD-first against cached reference
logits, written to JSON (and the ledger) as soon as it finishes, so a re-run resumes."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from quantatlas.environment import environment
from quantatlas.eval.bits import artifact_of, cap_check
from quantatlas.eval.bpb import bpb_metrics, eval_bytes
from quantatlas.eval.kld import concat_metrics, kld_statistics, token_metrics
from quantatlas.eval.windows import EvalSet, make_eval_set, reference_logprobs, scored_logits
from quantatlas.models import LoadedModel, load_model
from quantatlas.quant.quantize import attach_runtime, calibration_tokens, quantize_model, tensors_to_quantize
from quantatlas.quant.recipe import Recipe, build_recipe
from quantatlas.spec import Spec, parse_spec, stable_arm_config

RESULT_KEYS = ("kld_mean", "kld_se", "kld_median", "kld_p99", "kld_max", "same_top", "rms_dp", "ppl", "ppl_base",
               "ppl_ratio", "bpb", "bpb_base", "delta_bpb", "bits_per_weight", "bits_per_param", "bytes_packed",
               "bytes_file", "bytes_zstd", "bytes_brotli", "seconds")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def arm_key(arm_cfg: dict, model_hash: str, fingerprint: str) -> str:
    """What makes a stored arm x seed result reusable: the arm's config, the model and the eval tokens
    (and, for arms that calibrate, `data.calib`: checked apart, `Sweep.calib_changed`, so keys stay stable)."""
    blob = json.dumps({"arm": stable_arm_config(arm_cfg), "model": model_hash, "eval": fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate(model, es: EvalSet, ref: np.ndarray, device, batch: int, progress=None):
    """Per-token metrics of `model` against the reference log-probs over the eval set."""
    targets = es.targets()
    parts = []
    for off, logits in scored_logits(model, es, batch, device):
        n = logits.shape[0]
        base = torch.from_numpy(np.array(ref[off:off + n])).to(logits.device)
        parts.append(token_metrics(base, logits.float(), targets[off:off + n].to(logits.device)))
        if progress:
            progress(n)
    return concat_metrics(parts)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def reads_calibration(arm, recipe: Recipe) -> bool:
    """Whether an arm reads the calibration stream: solver statistics, allocation, or recovery."""
    return recipe.needs_calibration or arm.allocate is not None or recipe.recovery is not None


def _stored_seeds(path: Path | None) -> tuple[dict, dict, dict | None]:
    """Previously finished arm x seed results from a JSON file, and the allocations chosen for
    them (`allocate:` arms), each keyed by (arm key, seed); and the `data.calib` they were run
    with (None when the file does not say)."""
    if path is None or not path.exists():
        return {}, {}, None
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return {}, {}, None
    done, allocations = {}, {}
    for arm in old.get("arms", {}).values():
        for seed, res in arm.get("seeds", {}).items():
            if "key" in arm:
                done[(arm["key"], int(seed))] = res
                if seed in arm.get("allocations", {}):
                    allocations[(arm["key"], int(seed))] = arm["allocations"][seed]
    spec = old.get("spec")
    calib = spec.get("data", {}).get("calib") if isinstance(spec, dict) and isinstance(spec.get("data"), dict) else None
    return done, allocations, calib


class _Progress:
    """rich progress bars when attached to a terminal; silent otherwise."""

    def __init__(self, enabled: bool):
        self.p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), transient=True)

    def __enter__(self):
        if self.p:
            self.p.__enter__()
        return self

    def __exit__(self, *a):
        if self.p:
            self.p.__exit__(*a)

    def task(self, description: str, total: int):
        if not self.p:
            return None
        t = self.p.add_task(description, total=total)
        return lambda n=1: self.p.advance(t, n)


class Sweep:
    """One spec's run state, shared by the serial loop (`run_spec`) and the Ray fan-out
    (`quantatlas/sweep.py`): the loaded model, eval set, results document, the results stored
    before (JSON and ledger), and the plan of arm x seed steps. `record` is the single writer."""

    def __init__(self, spec: Spec | dict, json_path: str | Path | None = None, db_url: str | None = None,
                 device: str | None = None, ledger: bool = True, loaded: LoadedModel | None = None, log=print,
                 env: dict | None = None):
        if isinstance(spec, dict):
            spec = parse_spec(spec)
        self.spec, self.log, self.t_start = spec, log, time.time()
        self.device = device = device or default_device()
        self.json_path = Path(json_path) if json_path else None
        self.recipes: dict[str, Recipe] = {name: build_recipe(arm, f"arms.{name}") for name, arm in spec.arms.items()}
        self.lm = lm = loaded or load_model(spec.model, device=device)
        ev = spec.data.eval
        self.es = es = make_eval_set(lm.text_tokens(ev.source, "eval"), ev.tokens, ev.ctx, ev.score)
        self.env = env = env or environment(device)  # where the runs run (a Ray sweep: its tasks' threads)
        self.doc = doc = {
            "title": spec.title, "hypothesis": spec.hypothesis, "spec": spec.to_dict(), "spec_hash": spec.spec_hash(),
            "model": spec.model, "model_hash": lm.model_hash, "eval_fingerprint": es.fingerprint,
            "eval_tokens_scored": es.n_scored, "eval_bytes_scored": eval_bytes(es, lm.tokenizer), "n_params": lm.n_params, "environment": env, "arms": {},
        }
        self.done, self.allocations, stored_calib = _stored_seeds(self.json_path)
        # an arm key leaves data.calib out: results calibrated on other data are not reused (_stored_elsewhere)
        self.calib_changed = stored_calib is not None and stored_calib != spec.to_dict()["data"]["calib"]
        self.led = self.exp_id = None
        self.in_ledger: dict[tuple[str, int], dict] = {}
        if ledger:
            from quantatlas.atlas.ids import environment_key
            from quantatlas.atlas.ledger import Ledger

            self.led = Ledger(db_url)
            self.exp_id = self.led.register_experiment(spec.to_dict())
            doc["experiment_id"] = self.exp_id
            env_key = environment_key(env)
            # only this contributor's runs in this environment resume: another contributor's are theirs,
            # and running the spec again as someone else is a reproduction
            self.in_ledger = {(r["arm"], r["seed"]): r["metrics"] for r in self.led.runs(self.exp_id)
                              if r["environment_key"] == env_key and r["model_hash"] == lm.model_hash
                              and r["eval_fingerprint"] == es.fingerprint and r["contributor"] == self.led.contributor}
        self.copies: dict[tuple[str, int], np.ndarray | None] = {}
        self.keys = {name: (arm_key(arm.model_dump(mode="json"), lm.model_hash, es.fingerprint),
                            arm.model_dump(mode="json")) for name, arm in spec.arms.items()}

    def reference(self, bars) -> np.ndarray:
        ev = self.spec.data.eval
        return reference_logprobs(self.lm.model, self.lm.model_hash, self.es, self.device, ev.batch,
                                  bars.task("reference logits", self.es.n_scored))

    def plan(self) -> list[tuple[str, int, str, object]]:
        """Every arm x seed in order as (arm, seed, what, detail): ("stored", result) reuses a stored
        result, ("run", None) runs it, ("reuse", seed) copies that seed's run of an arm whose result
        does not depend on the seed."""
        steps = []
        for name, arm in self.spec.arms.items():
            key = self.keys[name][0]
            seeded = self.recipes[name].uses_seed or arm.seeded and arm.allocate is not None
            first = None
            for seed in self.spec.seeds:
                stored = self.in_ledger.get((name, seed))
                if stored is None:
                    stored = self._stored_elsewhere(name, seed)
                if stored is not None:
                    steps.append((name, seed, "stored", stored))
                elif not seeded and first is not None:
                    steps.append((name, seed, "reuse", first))
                else:
                    steps.append((name, seed, "run", None))
                    first = seed
        return steps

    def _stored_elsewhere(self, name: str, seed: int) -> dict | None:
        """A result for this arm x seed not yet in this experiment's ledger rows: this contributor's run
        of the same arm in another experiment (a spec changed: an arm added, a text reworded), else
        the results JSON. It is copied into this experiment when recorded (`self.copies`)."""
        key, cfg = self.keys[name]
        res = self.done.get((key, seed))
        if res is not None and self.calib_changed and self._calibrated(name):
            res = None   # the JSON's result was calibrated on the old data.calib
        if self.led is not None:
            from quantatlas.atlas.ids import environment_key

            data = self.spec.to_dict()
            calib = data["data"]["calib"] if self._calibrated(name) else None
            find = lambda env_key: self.led.find_run(data["arms"][name], seed, env_key, self.lm.model_hash,  # noqa: E731
                                                     self.es.fingerprint, calib)
            run = find(environment_key(self.env))
            if run is not None:
                self.copies[(name, seed)] = run["per_token_kld"]
                return run["metrics"]
            if res is not None:  # the JSON's result; its per-token KLD from the ledger run it came from
                run = find(None)
                same = run is not None and run["metrics"].get("kld_mean") == res.get("kld_mean")
                self.copies[(name, seed)] = run["per_token_kld"] if same else None
        return res

    def _calibrated(self, name: str) -> bool:
        """Whether the arm's result depends on `data.calib` (its own `calib:` is part of its key)."""
        arm = self.spec.arms[name]
        return arm.calib is None and reads_calibration(arm, self.recipes[name])

    def record(self, name: str, seed: int, res: dict, per_token=None, info: dict | None = None,
               stored: bool = False) -> None:
        """Put one arm x seed result in the document; a new one is also written to JSON and the ledger."""
        key, cfg = self.keys[name]
        entry = self.doc["arms"].setdefault(name, {"key": key, "config": cfg, "seeds": {}})
        entry["seeds"][str(seed)] = res
        if stored:
            if (key, seed) in self.allocations:  # keep the stored choice of an `allocate:` arm
                entry.setdefault("allocations", {})[str(seed)] = self.allocations[(key, seed)]
            self.log(f"{name} seed {seed}: stored result reused")
            if self.led is not None and (name, seed) in self.copies:
                self.led.record_run(self.exp_id, name, seed, res, self.copies[(name, seed)], self.env,
                                    self.lm.model_hash, self.es.fingerprint)
            return
        info = info or {}
        if "allocation" in info:  # the chosen codec per group: `allocate.assignment` reruns it
            entry.setdefault("allocations", {})[str(seed)] = info["allocation"]
            if self.led is not None and info["allocation"].get("measured"):
                from quantatlas.quant.sensitivity import Sensitivity

                sens = info["allocation"]["sensitivity"]
                self.led.record_sensitivity(self.exp_id, name, seed, sens, Sensitivity.from_dict(sens).rows(),
                                            self.lm.model_hash)
        if self.json_path:
            _write_json(self.json_path, self.doc)
        if self.led is not None:
            self.led.record_run(self.exp_id, name, seed, res, per_token, self.env, self.lm.model_hash,
                                self.es.fingerprint)

    def finish(self) -> dict:
        if self.led is not None and self.spec.control is not None:
            self.doc["verdicts"] = self.led.verdicts(self.exp_id)  # arms over the artifact cap are marked there
        self.doc["seconds"] = round(time.time() - self.t_start, 2)
        if self.json_path:
            _write_json(self.json_path, self.doc)
        return self.doc


def run_spec(spec: Spec | dict, json_path: str | Path | None = None, db_url: str | None = None,
             device: str | None = None, progress: bool = False, ledger: bool = True,
             loaded: LoadedModel | None = None, compress: bool = True, log=print) -> dict:
    """Run every arm x seed of `spec` and return the results document (also written to `json_path`).
    `quantatlas/sweep.py: run_spec_ray` runs the same plan as Ray tasks."""
    sw = Sweep(spec, json_path, db_url, device, ledger, loaded, log)
    spec, lm = sw.spec, sw.lm
    calib_stream = None
    runs: dict[tuple[str, int], tuple[dict, np.ndarray]] = {}
    with _Progress(progress) as bars:
        ref = sw.reference(bars)
        for name, seed, what, detail in sw.plan():
            if what == "stored":
                sw.record(name, seed, detail, stored=True)
                continue
            if what == "reuse":
                res, per_token = runs[(name, detail)]
                sw.record(name, seed, dict(res, reused_from_seed=detail), per_token)
                continue
            recipe, arm = sw.recipes[name], spec.arms[name]
            if reads_calibration(arm, recipe) and calib_stream is None:
                calib_stream = lm.text_tokens(spec.data.calib.source, "train")
            info: dict = {}
            res, per_token = _run_arm(lm, recipe, name, seed, sw.es, ref, sw.device, spec.data.eval.batch, spec,
                                      calib_stream, bars, compress, sw.doc["eval_bytes_scored"], info)
            runs[(name, seed)] = res, per_token
            sw.record(name, seed, res, per_token, info)
    return sw.finish()


def quantize_arm(lm: LoadedModel, spec: Spec, name: str, seed: int, recipe: Recipe | None = None,
                 calib_stream: np.ndarray | None = None, bars=None, info: dict | None = None, es: EvalSet | None = None):
    """A quantized copy of the model for one arm and seed: (model, packed tensors by parameter name).
    An arm with `allocate:` is resolved first (quant/sensitivity.py); `info["allocation"]` gets its choice.
    `es`: the run's eval set (recovery keeps its training windows off those tokens; built here if None)."""
    arm = spec.arms[name]
    recipe = recipe or build_recipe(arm, f"arms.{name}")
    calib = None
    if arm.allocate is not None:
        from quantatlas.quant.sensitivity import allocated_arm

        if calib_stream is None:
            calib_stream = lm.text_tokens(spec.data.calib.source, "train")
        c = arm.calib or spec.data.calib
        calib = calibration_tokens(calib_stream, c.samples, c.seq_len, seed)
        arm, allocation = allocated_arm(lm, arm, calib, seed)
        recipe = build_recipe(arm, f"arms.{name}")
        if info is not None:
            info["allocation"] = allocation
    torch.manual_seed(seed)
    model = copy.deepcopy(lm.model)
    if recipe.needs_calibration and calib is None:
        if calib_stream is None:
            calib_stream = lm.text_tokens(spec.data.calib.source, "train")
        c = spec.arms[name].calib or spec.data.calib
        calib = calibration_tokens(calib_stream, c.samples, c.seq_len, seed)
    task = None
    if bars is not None:
        n_tensors = sum(p.codec is not None for p in recipe.plan(tensors_to_quantize(model, recipe), model))
        task = bars.task(f"{name} seed {seed}: quantize", n_tensors)
    teachers = []  # recovery's teacher: the fp model after the transforms (same basis), before the weights
    keep = (lambda m: teachers.append(copy.deepcopy(m))) if recipe.recovery is not None else None
    packed = quantize_model(model, recipe, calib, seed, task, on_transformed=keep)
    if recipe.recovery is not None:
        from quantatlas.quant.recovery import Recovery, recover

        if not teachers:
            raise ValueError(f"arms.{name}.recovery: needs the whole fp model as teacher (not a layer-streamed one)")
        if calib_stream is None:
            calib_stream = lm.text_tokens(spec.data.calib.source, "train")
        ev = spec.data.eval
        eval_stream = lm.text_tokens(ev.source, "eval")
        es = es or make_eval_set(eval_stream, ev.tokens, ev.ctx, ev.score)
        total = Recovery(recipe.recovery, seed).total_steps(model)
        task = bars.task(f"{name} seed {seed}: recover", total) if bars is not None else None
        try:
            packed, rec = recover(model, teachers[0], packed, recipe.recovery, seed, calib_stream, eval_stream,
                                  es.windows.numel(), task)
        except ValueError as e:   # recovery's messages name its field: say which arm
            raise ValueError(f"arms.{name}.{e}") from None
        if info is not None:
            info["recovery"] = rec
    return model, packed


def _run_arm(lm, recipe, name, seed, es, ref, device, batch, spec, calib_stream, bars, compress=True,
             n_bytes: int | None = None, info: dict | None = None):
    t0 = time.time()
    if getattr(lm.model, "_qa_stream", None) is not None:  # layer streaming (models/stream.py)
        from quantatlas.models.stream import check_streamable

        check_streamable(spec, name, recipe)
    model, packed = quantize_arm(lm, spec, name, seed, recipe, calib_stream, bars, info, es)
    runtime_bits = attach_runtime(model, recipe, seed, ctx=es.ctx)  # KV-cache and activation steps act in the evaluation
    metrics = evaluate(model, es, ref, device, batch, bars.task(f"{name} seed {seed}: evaluate", es.n_scored))
    stats = kld_statistics(metrics)
    if hasattr(packed, "summary"):  # layer-streamed: bits counted from the packed files it wrote
        sizes = {k: packed.summary[k] for k in ("bits_per_weight", "bits_per_param", "bytes_packed")}
    else:
        art = artifact_of(model, packed)
        sizes = art.measure(compress, seed)
    res = {k: float(v) for k, v in stats.items()}
    if n_bytes:  # bits per byte of the eval text, and its change against the fp model (eval/bpb.py)
        res.update(bpb_metrics(metrics, n_bytes))
    res.update({k: float(v) for k, v in sizes.items()})
    if spec.artifact is not None:  # the real file's bytes after the cap's compressor
        res.update(cap_check(art.to_bytes(seed), spec.artifact.max_bytes, spec.artifact.compressor))
    res.update(runtime_bits)
    res.update({k: float(v) for k, v in (info or {}).get("recovery", {}).items()})  # CPU seconds, train KL
    res["seconds"] = round(time.time() - t0, 3)
    del model
    return res, metrics.kld.astype(np.float32)


def over_cap_arms(doc: dict) -> dict[str, float]:
    """Arms whose artifact exceeds the spec's `artifact:` cap in any seed: arm -> largest compressed bytes."""
    out = {}
    for name, arm in doc.get("arms", {}).items():
        sizes = [r["artifact_bytes"] for r in arm["seeds"].values() if r.get("over_cap")]
        if sizes:
            out[name] = max(sizes)
    return out


def format_table(doc: dict, width: int = 160) -> str:
    """The summary table: one row per arm, metrics averaged over seeds (KV and activation bits per
    stored value beside the weight bits when an arm quantizes them)."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    verdicts = {v.get("arm"): v for v in doc.get("verdicts", []) or []}
    runs = {name: list(arm["seeds"].values()) for name, arm in doc["arms"].items() if arm["seeds"]}
    has = {k: any(k in r for rs in runs.values() for r in rs)
           for k in ("kv_bits", "act_bits", "bytes_zstd", "delta_bpb", "artifact_bytes")}
    over = over_cap_arms(doc)
    cap = (doc.get("spec") or {}).get("artifact") or {}
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("arm", no_wrap=True)
    for col in ["bits/wt", "bits/param"] + (["KV bits"] if has["kv_bits"] else []) + \
            (["act bits"] if has["act_bits"] else []):
        table.add_column(col, justify="right")
    table.add_column("KLD mean ± SE")
    for col in ("KLD p99", "same-top", "PPL ratio") + (("Δbpb",) if has["delta_bpb"] else ()) + ("zstd MB",) + \
            ((f"{cap.get('compressor', '')} MB / cap {cap.get('max_bytes', 0) / 1e6:g}",) if has["artifact_bytes"] else ()) + \
            ("seeds",):
        table.add_column(col, justify="right")
    if verdicts:
        table.add_column("verdict")
    for name, rs in runs.items():
        def m(k):
            vals = [r[k] for r in rs if k in r]
            return float(np.mean(vals)) if vals else float("nan")

        kld = "0" if m("kld_mean") == 0 else f"{m('kld_mean'):.4g} ± {m('kld_se'):.2g}"
        row = [name, f"{m('bits_per_weight'):.3f}", f"{m('bits_per_param'):.3f}"]
        row += [f"{m('kv_bits'):.3f}" if "kv_bits" in rs[0] else "16"] if has["kv_bits"] else []
        row += [f"{m('act_bits'):.3f}" if "act_bits" in rs[0] else "16"] if has["act_bits"] else []
        row += [kld, f"{m('kld_p99'):.4g}", f"{100 * m('same_top'):.2f}%", f"{m('ppl_ratio'):.4f}"]
        row += [f"{m('delta_bpb'):+.4f}" if "delta_bpb" in rs[0] else "-"] if has["delta_bpb"] else []
        row.append(f"{m('bytes_zstd') / 1e6:.3f}" if "bytes_zstd" in rs[0] else "-")
        if has["artifact_bytes"]:
            size = max((r["artifact_bytes"] for r in rs if "artifact_bytes" in r), default=None)
            row.append("-" if size is None else f"{size / 1e6:.3f}" + (" OVER" if name in over else ""))
        row.append(str(len(rs)))
        if verdicts:
            row.append(verdicts.get(name, {}).get("result", "") + (" (over cap)" if name in over else ""))
        table.add_row(*row)
    out = StringIO()
    Console(file=out, width=width, color_system=None, highlight=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())
