"""Peer bench (issue 25 part 4): quantatlas's GPTQ against llm-compressor, AutoRound (and GPTQModel
where it installs), each tool in its own process and virtualenv, every result scored by OUR harness.

    OMP_NUM_THREADS=1 .venv/bin/python bench/peer_gptq.py [--models reference,reference-llama,llama1b] [--schemes int4,int3,w8a8]
        [--seeds 0,1,2] [--eval-tokens 32768] [--calib-samples 64] [--calib-seq-len 512]
        [--peers llmcompressor,llmcompressor-rtn,autoround,autoround-rtn,gptqmodel]
        [--ours NAME='{"solver_options": {"act_order": true}}' | --ours variants.yaml] [--threads 1]
        [--stream auto|0|1] [--working-copy] [--dir /tmp/quantatlas-bench] [--no-install] [--retry-install] [--fresh]
        [--out bench/results/peer_gptq.json]

    # issue 25's setting on the reference model; the 1.1 B model for time and memory
    OMP_NUM_THREADS=1 .venv/bin/python bench/peer_gptq.py --seeds 0,1,2 --schemes int4,int3 --ours variants.yaml
    OMP_NUM_THREADS=1 .venv/bin/python bench/peer_gptq.py --models llama1b --schemes int4 --seeds 0 \
        --peers llmcompressor --calib-samples 4 --out bench/results/peer_gptq_llama1b.json

What it does
1. Finds or installs each peer's virtualenv under --dir (venv-llmcompressor, venv-autoround,
   venv-gptqmodel): `python3 -m venv`, `pip install torch==2.13.0` (the small CPU build; this
   machine's pip finds it on local disk), then the tool from PyPI. Their transformers pins differ
   from ours, so none of them is installed beside quantatlas; GPTQModel's venv is held to our own
   pins (`pip freeze` of this interpreter as constraints): it joins only if it installs beside our
   dependencies, else the reason is printed and kept in the JSON.
2. Models: `reference` (the embedded Qwen3-architecture model, saved once as an fp32 HF folder for
   the peers; quantatlas loads it as `model: reference`, the same weights), `reference-llama` (the
   zoo's Llama, no q/k norms, the same way: `model: reference-llama`, scored too) and `llama1b` (the
   ~1.1 B random Llama of bench/peak_memory.py, time and memory only: not scored).
3. Calibration: quantatlas's own windows, `calibration_tokens(lm.text_tokens("stdlib", "train"),
   samples, seq_len, seed)` for each seed, written as .npy and handed to every tool unchanged.
4. Each (scheme, seed, side) runs in a fresh child process (bench/peer_gptq_worker.py) with
   OMP_NUM_THREADS / torch threads = --threads, all sides loading the model in fp32. The child times
   the quantization call alone (wall and process CPU seconds) and reads its peak RSS (VmHWM) right
   after it; the bench also keeps the whole child's wall and CPU seconds (wait4 rusage).
   Sides: ours = quantatlas's public call `quant.pipeline.quantize(lm, arm, calibration, ctx)` as a
   run makes it, on the loaded model itself (`in_place`: as the peers, the worker quantizes the model it
   loaded and keeps no fp weights; `--working-copy` runs it on a copy, as `quantatlas run` does, whose
   peak RSS then includes that copy; `--stream 1`
   takes the layer-streamed path) with quantatlas's default GPTQ (`solver: gptq, codec: {uniform:
   {bits: N}}`, printed resolved), each
   --ours variant (a partial arm deep-merged onto that default, so a variant names only what it
   changes; a variant with its own `codec` name replaces the codec, bits filled in) and, where an
   RTN peer runs, quantatlas's RTN (`codec: {uniform: {bits: N}}`). Peers: llm-compressor's
   `oneshot` with `GPTQModifier(scheme=W4A16 | W8A8 | an int3 g128 config group, ignore=[lm_head],
   dampening_frac=0.01)` (its defaults otherwise: actorder static; scales in the model's dtype, fp32
   here, so its bits per weight count 32-bit scales), its RTN `QuantizationModifier`; AutoRound
   (scheme W4A16 / W3A16 / INT8, i.e. W8A8 with per-token int8 activations in its tuning loop; its
   default 200 iterations; `amp=False`, i.e. tuned in fp32 like the others, where its CPU default
   would be bf16) and its plain RTN (`iters=0, disable_opt_rtn=True`).
5. Scoring: each run's dequantized decoder Linear weights (the worker's weights.safetensors) are
   loaded into quantatlas's fp32 reference model (everything else untouched) and scored by
   `quantatlas.measure.evaluate` against the cached reference log-probs (eval/windows.py) on the
   stdlib eval stream, ctx 512, second half scored: the eval set of a default quantatlas arm with
   `data.eval.tokens = --eval-tokens`. W8A8: both sides' weights are scored with the same per-token
   dynamic int8 activation quantizer (quantatlas's `act: W8A8`, symmetric absmax/127), so the
   activation half is identical by construction and the comparison is of the weights;
   the weights-only KLD is kept beside it.
6. Ratios ours / peer: KLD with a paired per-token block bootstrap (quantatlas.atlas.stats:
   each eval token's KLD averaged over the seeds on each side, eval windows as blocks, 4000
   resamples): ratio of means, its 95 % CI and p; with 2+ seeds a paired t over the per-seed means.
   Quantization wall, CPU and peak RSS: ratio of the sums over seeds.
   Our calibrated arms are set against the calibrated peers, our RTN arms (a variant with
   `solver: rtn` too) against the RTN peers.

Runs are cached under --dir/runs, keyed by tool, settings, model, calibration windows, threads, the
peer's package versions and, for our side, a hash of quantatlas's sources (the tree changes under a
long bench: a run whose sources changed while it ran, or an arm whose resolved config differs between
seeds, is marked (!) in the table); the worker's own code is not in the key: --fresh after editing it.
Writes --out (JSON: settings, versions, machine load, every run and every comparison) and prints the
tables. Not part of `make test`.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "peer_gptq_worker.py"
CPU_TORCH = "torch==2.13.0"

SCHEMES = {
    "int4": {"name": "int4", "bits": 4, "group": 128, "act": None},
    "int3": {"name": "int3", "bits": 3, "group": 128, "act": None},
    "w8a8": {"name": "w8a8", "bits": 8, "group": None, "act": "W8A8"},
}
#: peer -> (its virtualenv, what pip installs, what it imports, kind)
PEERS = {
    "llmcompressor": ("venv-llmcompressor", "llmcompressor", "llmcompressor", "calibrated"),
    "llmcompressor-rtn": ("venv-llmcompressor", "llmcompressor", "llmcompressor", "rtn"),
    "autoround": ("venv-autoround", "auto-round", "auto_round", "calibrated"),
    "autoround-rtn": ("venv-autoround", "auto-round", "auto_round", "rtn"),
    "gptqmodel": ("venv-gptqmodel", "gptqmodel", "gptqmodel", "calibrated"),
}
EMBEDDED = ("reference", "reference-llama")   # the zoo's dense models: scored
MODELS = (*EMBEDDED, "llama1b")


def log(msg: str) -> None:
    print(msg, flush=True)


# -- virtualenvs -----------------------------------------------------------------------------------
def imports(python: Path, module: str) -> bool:
    return python.exists() and subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def peer_python(peer: str, root: Path, install: bool, notes: dict, retry: bool = False) -> Path | None:
    """The peer's interpreter: its virtualenv under `root`, installed if missing (and allowed).
    None, with the reason in `notes`, when it cannot be had."""
    venv, package, module, _ = PEERS[peer]
    python = root / venv / "bin" / "python"
    if imports(python, module):
        return python
    if not install:
        notes[peer] = f"{python} cannot import {module} (run without --no-install to install it)"
        return None
    failed = root / f"{venv}.failed"
    if failed.exists() and not retry:   # an install that failed is not retried on every run
        notes[peer] = failed.read_text().strip() + " (--retry-install tries again)"
        return None
    logfile = root / f"{venv}-install.log"
    log(f"installing {package} in {root / venv} (log: {logfile})")
    steps = [["python3", "-m", "venv", str(root / venv)],
             [str(python), "-m", "pip", "install", CPU_TORCH]]
    if peer == "gptqmodel":   # joins only beside our own dependencies: hold pip to this interpreter's pins
        pins = root / "quantatlas-pins.txt"
        frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                                text=True).stdout
        pins.write_text("".join(x + "\n" for x in frozen.splitlines() if not x.startswith(("-e", "quantatlas"))))
        steps.append([str(python), "-m", "pip", "install", "-c", str(pins), package])
    else:
        steps.append([str(python), "-m", "pip", "install", package])
    with open(logfile, "a") as fh:
        for cmd in steps:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            try:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=3600).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout (1 h)"
            if rc != 0:
                lines = [x for x in logfile.read_text().splitlines() if not x.startswith("WARNING: Location")]
                why = [x.strip() for x in lines if "conflict is caused" in x or x.strip().startswith(
                    ("ERROR", "Exception", "error:"))]
                why = list(dict.fromkeys(why))[-3:] or lines[-3:]
                notes[peer] = f"`{' '.join(cmd[-3:])}` failed ({rc}): {' | '.join(why)}"
                if "-c" in cmd:
                    notes[peer] += newest_conflict(python, cmd, lines)
                failed.write_text(notes[peer] + "\n")
                return None
    if not imports(python, module):
        notes[peer] = f"installed, but `import {module}` fails in {python}"
        failed.write_text(notes[peer] + "\n")
        return None
    return python


def newest_conflict(python: Path, cmd: list[str], lines: list[str]) -> str:
    """Why pip backtracked past the newest releases under our pins: its resolver's own words for
    the two newest it tried (a dry run each)."""
    import re

    package = cmd[-1]
    pattern = re.compile(rf"Downloading {re.escape(package)}-(\d[\w.]*?)(?:\.tar\.gz|-py3|-cp)")
    tried = [m.group(1) for x in lines for m in [pattern.search(x)] if m]
    out = []
    for v in list(dict.fromkeys(tried))[:2]:
        run = subprocess.run([*cmd[:-1], "--dry-run", f"{package}=={v}"], capture_output=True, text=True, timeout=900)
        cause = [x.strip() for x in (run.stdout + run.stderr).splitlines() if " depends on " in x or "(constraint)" in x]
        if cause:
            out.append(f"{package} {v}: " + "; ".join(cause))
    if not out:
        return ""
    return " || under our pins: " + " || ".join(out) + f" || pip tried {len(set(tried))} releases down to {tried[-1]}"


# -- models and data -------------------------------------------------------------------------------
def reference_folder(root: Path, name: str = "reference") -> Path:
    """An embedded model of the zoo (`reference`, `reference-llama`) as an fp32 HF folder (config.json +
    model.safetensors) for the peers: the very fp32 weights `load_model(name)` gives quantatlas (the
    committed checkpoints are fp16; saved upcast once, so every tool loads the same fp32 tensors)."""
    folder = root / f"{name}-hf"
    if not (folder / "model.safetensors").exists():
        import torch

        from quantatlas.reference.model import load_reference

        load_reference(torch.float32, name=name).save_pretrained(folder)
    return folder


def llama1b_folder(root: Path) -> Path:
    """bench/peak_memory.py's random TinyLlama-shaped model (22 layers, 1.10 B parameters, fp16 shards)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("peak_memory", Path(__file__).parent / "peak_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build(root / "llama-random-22l", 22)


def folder_id(folder: Path) -> str:
    """Name, size and mtime of each file: enough to key cached runs on a folder that is built once."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# -- our arms --------------------------------------------------------------------------------------
def default_arm(scheme: dict, solver: str) -> dict:
    codec = {"uniform": {"bits": scheme["bits"]}}
    if scheme["group"] != 128:
        codec["uniform"]["group"] = scheme["group"]
    arm = {"codec": codec} if solver == "rtn" else {"solver": solver, "codec": codec}
    if scheme["act"]:
        arm["act"] = scheme["act"]
    return arm


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def variant_arm(scheme: dict, variant: dict) -> dict:
    """A --ours variant on the scheme's default GPTQ arm: deep-merged; a codec of another name
    replaces the default one (with the scheme's bits unless it gives its own)."""
    base = default_arm(scheme, "gptq")
    codec = variant.get("codec")
    if isinstance(codec, dict) and len(codec) == 1 and next(iter(codec)) not in base["codec"]:
        name, opts = next(iter(codec.items()))
        base["codec"] = {name: {"bits": scheme["bits"], **(opts or {})}}
        variant = {k: v for k, v in variant.items() if k != "codec"}
    return merge(base, variant)


def parse_ours(items: list[str]) -> dict[str, dict]:
    """--ours NAME=JSON/YAML text, NAME=FILE, or FILE (a mapping NAME -> partial arm)."""
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not eq:
            name, text = "", item
        path = Path(text)
        if path.is_file():
            text = path.read_text()
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SystemExit(f"--ours {item!r}: not YAML/JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(value, dict):
            raise SystemExit(f"--ours {item!r}: expected a mapping, got {type(value).__name__}")
        if name:
            out[name] = value
        else:
            for k, v in value.items():
                if not isinstance(v, dict):
                    raise SystemExit(f"--ours {item!r}: {k}: expected a mapping (a partial arm), got {v!r}")
                out[str(k)] = v
    for name in out:
        if name in ("gptq", "rtn") or name in PEERS:
            raise SystemExit(f"--ours: the name {name!r} is taken (gptq, rtn and the peers' names are)")
    return out


def check_arm(name: str, arm: dict) -> None:
    from quantatlas.quant.recipe import build_recipe
    from quantatlas.spec import Arm

    try:
        build_recipe(Arm(**arm), f"ours.{name}")
    except Exception as e:  # noqa: BLE001 - pydantic and recipe errors alike: one line for the user
        why = " ".join(x.strip() for x in str(e).splitlines()[:3] if "For further information" not in x)
        raise SystemExit(f"--ours {name}: {why} (arm: {json.dumps(arm)})") from None


# -- runs ------------------------------------------------------------------------------------------
def run_child(python: Path, job: dict, run_dir: Path, timeout: float) -> dict:
    """The worker in a fresh process; its result plus the whole process's wall and CPU seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.json").write_text(json.dumps(job, indent=1) + "\n")
    threads = str(job["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    t0 = time.perf_counter()
    with open(run_dir / "log.txt", "w") as fh:
        proc = subprocess.Popen([str(python), str(WORKER), str(run_dir / "job.json")], cwd=run_dir, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    result_file = run_dir / "result.json"
    if proc.returncode != 0 or not result_file.exists():
        tail = (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-4:]
        raise RuntimeError(f"{job['tool']} failed (exit {proc.returncode}, log {run_dir / 'log.txt'}): "
                           + " | ".join(tail))
    res = json.loads(result_file.read_text())
    # (the child's ru_maxrss is not used: Linux carries the forking parent's high-water mark across
    # exec; the worker's own VmHWM is the child's)
    res.update(process_wall_s=wall, process_cpu_s=usage.ru_utime + usage.ru_stime)
    result_file.write_text(json.dumps(res, indent=1) + "\n")
    return res


def sources_fingerprint() -> str:
    """sha256 of quantatlas's Python sources as they are now (names and contents)."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "quantatlas").rglob("*.py")):
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


_PEER_VERSIONS: dict[str, dict] = {}


def peer_versions(peer: str, python: Path | None = None) -> dict:
    """The peer's packages as installed in its virtualenv (read once; part of its runs' cache key)."""
    if peer not in _PEER_VERSIONS:
        venv, package, _, _ = PEERS[peer]
        code = ("import json, importlib.metadata as m; out = {}\n"
                f"for n in {[package, 'torch', 'transformers', 'compressed-tensors']!r}:\n"
                "    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
        run = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
        _PEER_VERSIONS[peer] = json.loads(run.stdout)
    return _PEER_VERSIONS[peer]


def job_key(job: dict) -> str:
    keyed = {k: v for k, v in job.items() if k != "out"}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]


# -- scoring ---------------------------------------------------------------------------------------
class Scorer:
    """quantatlas's harness on the reference model: eval set, cached reference log-probs, evaluate."""

    def __init__(self, lm, eval_tokens: int, ctx: int = 512, batch: int = 8):
        from quantatlas.eval.windows import make_eval_set, reference_logprobs

        self.lm, self.batch = lm, batch
        self.es = make_eval_set(lm.text_tokens("stdlib", "eval"), eval_tokens, ctx, "second_half")
        self.ref = reference_logprobs(lm.model, lm.model_hash, self.es, "cpu", batch)

    def kld(self, weights: dict | None, act: str | None) -> np.ndarray:
        """Per scored token KLD of the reference model with `weights` (name -> tensor) put in place
        and, if `act` names an activation scheme, quantatlas's activation quantizer attached."""
        import torch

        from quantatlas.measure import evaluate
        from quantatlas.quant.act import ActivationQuantizer
        from quantatlas.spec import Arm

        model = copy.deepcopy(self.lm.model)
        if weights is not None:
            params = dict(model.named_parameters())
            missing = sorted(set(weights) - set(params))
            if missing:
                raise RuntimeError(f"weights for parameters the model lacks: {missing[:3]}")
            with torch.no_grad():
                for name, w in weights.items():
                    if params[name].shape != w.shape:
                        raise RuntimeError(f"{name}: shape {tuple(w.shape)}, the model's is {tuple(params[name].shape)}")
                    params[name].copy_(w)
        if act:   # the same activation quantizer for every side: quantatlas's `act:` step
            ActivationQuantizer(Arm(act=act).act, 0).attach(model)
        m = evaluate(model, self.es, self.ref, "cpu", self.batch)
        return np.asarray(m.kld, dtype=np.float64)

    def score_run(self, run_dir: Path, scheme: dict) -> dict:
        """KLD of one run's weights (cached in its folder by eval fingerprint)."""
        from safetensors.torch import load_file

        fp = self.es.fingerprint
        out = {}
        weights = None
        for tag, act in (("", scheme["act"]), ("_weights_only", None)) if scheme["act"] else (("", None),):
            path = run_dir / f"kld-{fp}{tag or ''}.npy"
            if not path.exists():
                if weights is None:
                    weights = load_file(str(run_dir / "weights.safetensors"))
                np.save(path, self.kld(weights, act))
            k = np.load(path)
            out[f"kld_mean{tag}"] = float(k.mean())
            out[f"kld_file{tag}"] = str(path)
        return out


def bootstrap_ratio(ours: list[np.ndarray], peer: list[np.ndarray], block: int) -> dict:
    """Ours / peer mean KLD over the same tokens and seeds: per token averaged over seeds, then
    quantatlas's paired block bootstrap (control = peer, treatment = ours)."""
    from quantatlas.atlas.stats import block_bootstrap, paired_t

    t = np.mean(np.stack(ours), axis=0)
    c = np.mean(np.stack(peer), axis=0)
    b = block_bootstrap(c, t, block, alpha=0.05)
    out = {"ratio": float(t.mean() / c.mean()) if c.mean() > 0 else float("nan"), "n_tokens": int(t.size), "block": block, "n_boot": b.n_boot,
           "p": b.p, "ci95": None if b.ci_relative is None else [1.0 - b.ci_relative[1], 1.0 - b.ci_relative[0]]}
    if len(ours) >= 2:
        pt = paired_t(np.array([p.mean() for p in peer]) - np.array([o.mean() for o in ours]), 0.05)
        out["seeds_paired_t_p"] = pt.p
    return out


# -- the bench -------------------------------------------------------------------------------------
def make_job(side: str, model: str, folder: Path, scheme: dict, seed: int, calib: Path, scored: bool, args,
             variants: dict) -> dict:
    """What the worker is told (and what keys its cached run)."""
    job = {"tool": side if side in PEERS else "quantatlas", "scheme": scheme, "seed": seed, "threads": args.threads,
           "calib": str(calib), "calib_sha": file_sha(calib), "model_dir": str(folder), "model_id": folder_id(folder),
           "write_weights": scored}
    if side not in PEERS:
        job["model"] = model if model in EMBEDDED else str(folder)
        job["arm"] = default_arm(scheme, side) if side in ("gptq", "rtn") else variant_arm(scheme, variants[side])
        job["stream"] = None if args.stream == "auto" else args.stream == "1"
        if args.working_copy:   # (left out of the job when off: its key, and so the cache, is as before)
            job["in_place"] = False
        # quantatlas is edited while benches run: a cached run stands only for the sources it ran
        job["quantatlas_sources"] = sources_fingerprint()
    else:
        job["peer_versions"] = peer_versions(side)
        if args.save_artifacts and side.startswith("llmcompressor"):
            job["save_artifact"] = True
    job["out"] = str(Path(args.dir) / "runs" / model / scheme["name"] / side / f"s{seed}-{job_key(job)}")
    return job


def run_side(job: dict, python: Path, scorer, args, label: str) -> dict | None:
    """One run (or its cached result) and its scores; None, logged, if it failed."""
    run_dir = Path(job["out"])
    done = run_dir / "result.json"
    fresh = args.fresh or not done.exists() or (job["write_weights"] and not (run_dir / "weights.safetensors").exists()) \
        or (job.get("save_artifact") and not (run_dir / "compressed-tensors").is_dir())
    try:
        if fresh:
            log(f"{label}: quantizing ...")
            res = run_child(python, job, run_dir, args.timeout)
        else:
            res = json.loads(done.read_text())
        if scorer is not None:
            res.update(scorer.score_run(run_dir, job["scheme"]))
    except RuntimeError as e:
        log(f"{label}: FAILED: {e}")
        return None
    arm = job.get("arm")
    res["kind"] = None if arm is None else ("rtn" if arm.get("solver", "rtn") == "rtn" else "calibrated")
    if fresh and "quantatlas_sources" in job and sources_fingerprint() != job["quantatlas_sources"]:
        res["sources_changed_during_run"] = True   # flagged in the comparisons
        (run_dir / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    res["run_dir"] = str(run_dir)
    if job.get("save_artifact"):   # a stable name for an `artifact:` arm (experiments/tools/external.yaml)
        link = Path(args.dir) / "artifacts" / f"{Path(job['model_dir']).name}-{job['scheme']['name']}-{job['tool']}-s{job['seed']}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(run_dir / "compressed-tensors", target_is_directory=True)
        res["artifact"] = str(link)
        log(f"{label}: compressed-tensors folder {link}")
    log(f"{label}: quantize {res['quant_wall_s']:.1f} s wall, {res['quant_cpu_s']:.1f} s CPU, peak RSS "
        f"{res['peak_rss_mb']:.0f} MB" + (f", KLD {res['kld_mean']:.6f}" if scorer is not None else "")
        + ("" if fresh else " (cached)"))
    return res


def sides_for(args, variants) -> list[tuple[str, str]]:
    """(side, kind) in run order: ours first, then the peers (our arms' kind follows their solver)."""
    sides = [("gptq", "calibrated")] + [(n, None) for n in variants]
    if any(PEERS[p][3] == "rtn" for p in args.peers):
        sides.append(("rtn", "rtn"))
    return sides + [(p, PEERS[p][3]) for p in args.peers]


def nominal_bits(scheme: dict, settings: dict) -> float:
    """Stored bits per weight of a peer's scheme: codes, plus one scale per group (per row for
    w8a8: amortised over the reference model's smallest input width, 256, as an upper bound)."""
    scale_bits = 32 if "float32" in str(settings.get("scale_dtype", "")) else 16
    return scheme["bits"] + scale_bits / (scheme["group"] or 256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="reference", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--schemes", default="int4,int3,w8a8", help=f"comma-separated: {', '.join(SCHEMES)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--peers", default="llmcompressor,llmcompressor-rtn,autoround,autoround-rtn,gptqmodel",
                    help=f"comma-separated: {', '.join(PEERS)} (or 'none')")
    ap.add_argument("--ours", action="append", default=[],
                    help="NAME=partial arm (JSON/YAML text or file) merged onto the default GPTQ arm; "
                         "or a YAML/JSON file mapping names to partial arms; repeatable")
    ap.add_argument("--stream", choices=("auto", "0", "1"), default="auto",
                    help="quantatlas's layer streaming for a folder model (auto: load_model's own rule)")
    ap.add_argument("--working-copy", action="store_true",
                    help="quantatlas quantizes a copy of the loaded model (as `quantatlas run` does) instead of the "
                         "loaded model itself")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--dir", default=os.environ.get("QUANTATLAS_BENCH_DIR", "/tmp/quantatlas-bench"))
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per quantization run")
    ap.add_argument("--no-install", action="store_true", help="use the peers' virtualenvs only if they exist")
    ap.add_argument("--retry-install", action="store_true", help="retry a peer install that failed before")
    ap.add_argument("--fresh", action="store_true", help="rerun cached runs")
    ap.add_argument("--save-artifacts", action="store_true",
                    help="llm-compressor runs also save their compressed-tensors folder, linked as "
                         "DIR/artifacts/<model folder>-<scheme>-<tool>-s<seed> (an `artifact:` arm reads it: "
                         "experiments/tools/external.yaml)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "peer_gptq.json"))
    args = ap.parse_args()

    models = [m for m in args.models.split(",") if m]
    schemes = [s for s in args.schemes.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.peers = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    for what, got, known in (("--models", models, MODELS), ("--schemes", schemes, SCHEMES), ("--peers", args.peers, PEERS)):
        bad = [x for x in got if x not in known]
        if bad or not got and what != "--peers":
            raise SystemExit(f"{what}: unknown {', '.join(bad) or '(empty)'} (known: {', '.join(known)})")
    variants = parse_ours(args.ours)
    for s in schemes:
        for name, v in variants.items():
            check_arm(name, variant_arm(SCHEMES[s], v))
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    torch.set_num_threads(args.threads)
    from quantatlas.models import load_model
    from quantatlas.quant.quantize import calibration_tokens

    notes: dict[str, str] = {}
    pythons = {}
    for p in args.peers:
        py = peer_python(p, root, not args.no_install, notes, args.retry_install)
        if py is None:
            log(f"peer {p} left out: {notes[p]}")
        else:
            pythons[p] = py
            peer_versions(p, py)
    lms = {}

    def loaded(name: str):   # the scored model's harness; the random Llama has no tokenizer: the reference's bytes
        if name not in lms:
            lms[name] = load_model(name)
        return lms[name]

    calib_stream = loaded("reference").text_tokens("stdlib", "train")
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "settings": {"models": models, "schemes": schemes, "seeds": seeds, "eval_tokens": args.eval_tokens,
                        "eval_ctx": 512, "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
                        "threads": args.threads, "peers": args.peers, "ours": variants, "stream": args.stream},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
           "notes": notes, "versions": {}, "models": {}}
    out_path = Path(args.out)

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=float) + "\n")
        os.replace(tmp, out_path)

    for model in models:
        scored = model in EMBEDDED
        folder = reference_folder(root, model) if scored else llama1b_folder(root)
        if scored:   # every zoo model reads the same byte stream: the same calibration windows
            assert np.array_equal(loaded(model).text_tokens("stdlib", "train"), calib_stream), model
        calib_files = {}
        for seed in seeds:
            path = root / "calib" / f"stdlib-{args.calib_samples}x{args.calib_seq_len}-s{seed}.npy"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, calibration_tokens(calib_stream, args.calib_samples, args.calib_seq_len, seed).numpy())
            calib_files[seed] = path
        scorer = Scorer(loaded(model), args.eval_tokens) if scored else None
        mdoc = doc["models"][model] = {"folder": str(folder), "runs": {}, "comparisons": []}
        if scored:
            mdoc.update(eval_fingerprint=scorer.es.fingerprint, eval_tokens_scored=scorer.es.n_scored,
                        fp_check_kld=float(scorer.kld(None, None).mean()))   # the harness path: exactly 0
        for s in schemes:
            scheme = SCHEMES[s]
            runs = mdoc["runs"][s] = {}
            for seed in seeds:
                for side, kind in sides_for(args, variants):
                    if side in PEERS and side not in pythons:
                        continue
                    job = make_job(side, model, folder, scheme, seed, calib_files[seed], scored, args, variants)
                    res = run_side(job, Path(sys.executable) if side not in PEERS else pythons[side], scorer, args,
                                   f"[{model} {s} seed {seed}] {side}")
                    if res is None:
                        notes[f"{model}/{s}/{side}/seed{seed}"] = "failed: see the log above"
                    else:
                        res["kind"] = kind or res["kind"]
                        res.setdefault("bits_per_weight", nominal_bits(scheme, res.get("settings", {})))
                        doc["versions"][job["tool"]] = res.get("versions", {})
                        runs.setdefault(side, {})[str(seed)] = res
                    save()
            mdoc["comparisons"] += compare(s, runs, scorer)
        save()
    doc["machine"]["load_avg_end"] = os.getloadavg()
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print_tables(doc)
    log(f"wrote {out_path}")


def compare(scheme: str, runs: dict, scorer) -> list[dict]:
    """Ours / peer for every our-side x peer pair of one kind, over the seeds both have."""
    out = []
    for side, by_seed in runs.items():
        if side in PEERS:
            continue
        kind = next(iter(by_seed.values()))["kind"]   # our RTN arms against the RTN peers
        for peer, pby_seed in runs.items():
            if peer not in PEERS or PEERS[peer][3] != kind:
                continue
            seeds = sorted(set(by_seed) & set(pby_seed), key=int)
            if not seeds:
                continue
            row = {"scheme": scheme, "ours": side, "peer": peer, "seeds": [int(s) for s in seeds]}
            # one computation across the seeds: the same resolved arm, sources unchanged while each ran
            arms = {json.dumps(by_seed[s].get("settings", {}).get("arm"), sort_keys=True) for s in seeds}
            row["consistent"] = len(arms) == 1 and not any(by_seed[s].get("sources_changed_during_run") for s in seeds)
            for key in ("quant_wall_s", "quant_cpu_s", "peak_rss_mb", "process_wall_s", "process_cpu_s"):
                row[f"{key}_ratio"] = sum(by_seed[s][key] for s in seeds) / sum(pby_seed[s][key] for s in seeds)
            above = lambda r: r["peak_rss_mb"] - r["rss_loaded_mb"]  # noqa: E731 what quantization added
            row["peak_above_loaded_mb"] = [float(np.mean([above(by_seed[s]) for s in seeds])),
                                           float(np.mean([above(pby_seed[s]) for s in seeds]))]
            if scorer is not None:
                for tag in ("", "_weights_only"):
                    if f"kld_file{tag}" not in by_seed[seeds[0]]:
                        continue
                    o = [np.load(by_seed[s][f"kld_file{tag}"]) for s in seeds]
                    p = [np.load(pby_seed[s][f"kld_file{tag}"]) for s in seeds]
                    row[f"kld{tag}"] = bootstrap_ratio(o, p, scorer.es.scored_per_window)
                    row[f"kld{tag}"].update(ours=float(np.mean([x.mean() for x in o])),
                                            peer=float(np.mean([x.mean() for x in p])))
            out.append(row)
    return out


def print_tables(doc: dict) -> None:
    for model, m in doc["models"].items():
        log(f"\n== {model} ({m['folder']}); eval {m.get('eval_tokens_scored', '-')} scored tokens, "
            f"calib {doc['settings']['calib_samples']} x {doc['settings']['calib_seq_len']}, "
            f"threads {doc['settings']['threads']}, seeds {doc['settings']['seeds']}")
        log(f"{'scheme':6} {'side':18} {'bits/wt':>7} {'KLD mean':>10} {'KLD per seed':32} {'quant s':>8} "
            f"{'CPU s':>8} {'peak MB':>8} {'+load MB':>8}")
        for s, runs in m["runs"].items():
            for side, by_seed in runs.items():
                r = list(by_seed.values())
                kld = [x.get("kld_mean") for x in r]
                ks = " ".join(f"{k:.6f}" for k in kld if k is not None)
                km = f"{np.mean(kld):10.6f}" if None not in kld else f"{'-':>10}"
                log(f"{s:6} {side:18} {r[0]['bits_per_weight']:7.3f} {km} {ks:32} "
                    f"{np.mean([x['quant_wall_s'] for x in r]):8.2f} {np.mean([x['quant_cpu_s'] for x in r]):8.2f} "
                    f"{np.mean([x['peak_rss_mb'] for x in r]):8.0f} "
                    f"{np.mean([x['peak_rss_mb'] - x['rss_loaded_mb'] for x in r]):8.0f}")
        log(f"\n{'scheme':6} {'ours':16} {'peer':18} {'KLD ratio [95% CI]':28} {'p':>8} {'wall':>6} {'CPU':>6} "
            f"{'peakRSS':>7}  (ours / peer)")
        for c in m["comparisons"]:
            k = c.get("kld")
            kr = "-" if k is None else f"{k['ratio']:.3f} " + ("[-]" if k["ci95"] is None else
                                                                 f"[{k['ci95'][0]:.3f}, {k['ci95'][1]:.3f}]")
            kp = "-" if k is None else f"{k['p']:.2g}"
            mark = "" if c.get("consistent", True) else " (!)"
            log(f"{c['scheme']:6} {c['ours'] + mark:16} {c['peer']:18} {kr:28} {kp:>8} {c['quant_wall_s_ratio']:6.2f} "
                f"{c['quant_cpu_s_ratio']:6.2f} {c['peak_rss_mb_ratio']:7.2f}")
            if "kld_weights_only" in c:
                w = c["kld_weights_only"]
                ci = "[-]" if w["ci95"] is None else f"[{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]"
                log(f"{'':6} {'':16} {'(weights only)':18} {w['ratio']:.3f} {ci}")
    if any(not c.get("consistent", True) for m in doc["models"].values() for c in m["comparisons"]):
        log("(!) the seeds of this arm ran different computations (its resolved config differs between seeds, "
            "or quantatlas's sources changed during a run): rerun with --fresh")
    for model, m in doc["models"].items():
        for s, runs in m["runs"].items():
            for side, by_seed in runs.items():
                arm = next(iter(by_seed.values())).get("settings", {}).get("arm")
                if side == "gptq" and arm is not None:
                    log(f"{model} {s} gptq = quantatlas's default, resolved: {json.dumps(arm.get('solver_options'))} "
                        f"{json.dumps(arm.get('codec'))}")
    if doc["notes"]:
        log("\nnotes:")
        for k, v in doc["notes"].items():
            log(f"  {k}: {v}")


if __name__ == "__main__":
    main()
