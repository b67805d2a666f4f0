"""Run a spec: plan its arms x seeds on one model, resume what is stored, and record each result
(JSON and the ledger) as soon as it finishes, so a re-run resumes. Quantizing and measuring one
arm x seed is `quantatlas.measure.measure_arm` (the pipeline, then the harness)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from quantatlas.context import RunContext
from quantatlas.environment import environment
from quantatlas.errors import UserError
from quantatlas.eval.bpb import eval_bytes
from quantatlas.eval.windows import make_eval_set, reference_logprobs
from quantatlas.measure import calibration_for, measure_arm
from quantatlas.models import LoadedModel, load_model
from quantatlas.models.layout import layout
from quantatlas.progress import Progress
from quantatlas.quant.pipeline import check_backend
from quantatlas.quant.steps import arm_reads_calibration
from quantatlas.spec import Spec, parse_spec, resolve_inputs, stable_arm_config

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


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


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


class Sweep:
    """One spec's run state, shared by the serial loop (`run_spec`) and the Ray fan-out
    (`quantatlas/sweep.py`): the loaded model, eval set, results document, the results stored
    before (JSON and ledger), and the plan of arm x seed steps. `record` is the single writer."""

    def __init__(self, spec: Spec | dict, json_path: str | Path | None = None, db_url: str | None = None,
                 device: str | None = None, ledger: bool = True, loaded: LoadedModel | None = None, log=print,
                 env: dict | None = None):
        if isinstance(spec, dict):
            spec = parse_spec(spec)
        if spec.is_study:   # several models: quantatlas/study.py runs one Sweep per model (spec.for_model)
            raise UserError(f"field models: a study of {len(spec.models)} models runs one experiment per model: "
                            "run it with quantatlas.study.run_study (as `quantatlas run` does)", "models")
        # artifact arms: read the files (a relative path from the working directory), fill in their content
        # hash, refuse one that is not there, before the model is loaded (load_spec resolved a spec file's)
        spec = resolve_inputs(spec, Path.cwd(), require=True)
        self.spec, self.log, self.t_start = spec, log, time.time()
        self.device = device = device or default_device()
        self.json_path = Path(json_path) if json_path else None
        self.lm = lm = loaded or load_model(spec.model, device=device)
        layout(lm.model).check()  # a model whose modules have no role is refused before anything is stored
        for name, arm in spec.arms.items():  # a step the backend cannot run is refused before any work
            check_backend(lm, arm, f"arms.{name}")
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
            self.in_ledger = {(r["arm"], r["seed"]): stored_result(r) for r in self.led.runs(self.exp_id)
                              if r["environment_key"] == env_key and r["model_hash"] == lm.model_hash
                              and r["eval_fingerprint"] == es.fingerprint and r["contributor"] == self.led.contributor}
        self.copies: dict[tuple[str, int], np.ndarray | None] = {}
        self.keys = {name: (arm_key(arm.model_dump(mode="json"), lm.model_hash, es.fingerprint),
                            arm.model_dump(mode="json")) for name, arm in spec.arms.items()}

    def reference(self, bars) -> np.ndarray:
        ev = self.spec.data.eval
        return reference_logprobs(self.lm.forward, self.lm.model_hash, self.es, self.device, ev.batch,
                                  bars.task("reference logits", self.es.n_scored))

    def plan(self) -> list[tuple[str, int, str, object]]:
        """Every arm x seed in order as (arm, seed, what, detail): ("stored", result) reuses a stored
        result, ("run", None) runs it, ("reuse", seed) copies that seed's run of an arm whose result
        does not depend on the seed."""
        steps = []
        for name, arm in self.spec.arms.items():
            seeded = arm.seeded
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
                return stored_result(run)
            if res is not None:  # the JSON's result; its per-token KLD from the ledger run it came from
                run = find(None)
                same = run is not None and run["metrics"].get("kld_mean") == res.get("kld_mean")
                self.copies[(name, seed)] = run["per_token_kld"] if same else None
        return res

    def _calibrated(self, name: str) -> bool:
        """Whether the arm's result depends on `data.calib` (its own `calib:` is part of its key)."""
        arm = self.spec.arms[name]
        return arm.calib is None and arm_reads_calibration(arm)

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
                self.led.record_run(self.exp_id, name, seed, self.with_arch(res), self.copies[(name, seed)],
                                    self.env, self.lm.model_hash, self.es.fingerprint)
            return
        info = info or {}
        if "moe" in info:  # tokens routed to each expert of each MoE layer, and those under the threshold
            entry.setdefault("coverage", {})[str(seed)] = info["moe"]
        if "rotations" in info:  # recovery roste: each layer's chosen rotation and the errors it chose by
            entry.setdefault("rotations", {})[str(seed)] = info["rotations"]
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
            self.led.record_run(self.exp_id, name, seed, self.with_arch(res), per_token, self.env,
                                self.lm.model_hash, self.es.fingerprint)

    def with_arch(self, res: dict) -> dict:
        """A result as the ledger stores it: with the model's architecture (its config's model_type: qwen3,
        llama, qwen3_moe), which the atlas judges findings across (atlas/architecture.py)."""
        arch = getattr(getattr(self.lm.model, "config", None), "model_type", None)
        return dict(res, model_arch=arch) if isinstance(arch, str) and arch else res

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
    streams: dict = {}
    calib_stream = lambda: streams.setdefault("calib", lm.text_tokens(spec.data.calib.source, "train"))  # noqa: E731
    runs: dict[tuple[str, int], tuple[dict, np.ndarray]] = {}
    with Progress(progress) as bars:
        ref = sw.reference(bars)
        plan = sw.plan()
        for done, (name, seed, what, detail) in enumerate(plan, 1):
            if what == "stored":
                sw.record(name, seed, detail, stored=True)
                bars.finished(name, seed, done=done, total=len(plan), note="stored")
                continue
            if what == "reuse":
                res, per_token = runs[(name, detail)]
                sw.record(name, seed, dict(res, reused_from_seed=detail), per_token)
                bars.finished(name, seed, done=done, total=len(plan), note=f"copied from seed {detail}")
                continue
            ctx = RunContext(seed, sw.device, torch.get_num_threads())
            res, per_token, records = measure_arm(lm, spec, name, ctx, sw.es, ref,
                                                  calibration_for(lm, spec, name, sw.es, calib_stream),
                                                  bars if progress else None, compress, sw.doc["eval_bytes_scored"])
            runs[(name, seed)] = res, per_token
            sw.record(name, seed, res, per_token, records)
            bars.finished(name, seed, seconds=res["seconds"], done=done, total=len(plan))
    return sw.finish()


def over_cap_arms(doc: dict) -> dict[str, float]:
    """Arms whose artifact exceeds the spec's `artifact:` cap in any seed: arm -> largest compressed bytes."""
    out = {}
    for name, arm in doc.get("arms", {}).items():
        sizes = [r["artifact_bytes"] for r in arm["seeds"].values() if r.get("over_cap")]
        if sizes:
            out[name] = max(sizes)
    return out


def stored_result(run: dict) -> dict:
    """A ledger run as a result: its metrics, and the stored fields a result carries besides numbers
    (`runs_on`), so a copied run keeps them."""
    extra = run.get("extra") or {}
    return dict(run["metrics"], **({"runs_on": extra["runs_on"]} if "runs_on" in extra else {}))


def format_table(doc: dict, width: int = 160) -> str:
    """The summary table: one row per arm, metrics averaged over seeds (KV and activation bits per
    stored value beside the weight bits when an arm quantizes them)."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    verdicts = {v.get("arm"): v for v in doc.get("verdicts", []) or []}
    runs = {name: list(arm["seeds"].values()) for name, arm in doc["arms"].items() if arm["seeds"]}
    has = {k: any(k in r for rs in runs.values() for r in rs)
           for k in ("kv_bits", "act_bits", "bytes_zstd", "delta_bpb", "artifact_bytes", "kld_mean_ttt")}
    over = over_cap_arms(doc)
    cap = (doc.get("spec") or {}).get("artifact") or {}
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("arm", no_wrap=True)
    for col in ["bits/wt", "bits/param"] + (["KV bits"] if has["kv_bits"] else []) + \
            (["act bits"] if has["act_bits"] else []):
        table.add_column(col, justify="right")
    table.add_column("KLD mean ± SE")
    for col in ("KLD p99", "same-top", "PPL ratio") + (("Δbpb",) if has["delta_bpb"] else ()) + \
            (("KLD TTT", "Δbpb TTT") if has["kld_mean_ttt"] else ()) + ("zstd MB",) + \
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
        if has["kld_mean_ttt"]:  # score-first test-time training (eval/ttt.py), beside the standard metrics
            row += [f"{m('kld_mean_ttt'):.4g}" if "kld_mean_ttt" in rs[0] else "-",
                    f"{m('delta_bpb_ttt'):+.4f}" if "delta_bpb_ttt" in rs[0] else "-"]
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
