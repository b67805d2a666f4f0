"""Ray sweeps: a spec's arms x seeds as Ray tasks, one per arm x seed that has to run.

The driver keeps the single writer role. It plans the sweep exactly as the serial loop does
(`runner.Sweep.plan`: stored results are reused, a seed-independent arm runs once), computes the
reference log-probs once and ships them (with the eval set, and an in-memory model when one was
given) through the object store, submits every run, then records the results in the plan's order
(JSON and ledger, each run once), so the document and the ledger equal a serial run's. A task
that still fails after `retries` retries is reported (`doc["failures"]`: arm, seed, error) and the
other results are kept; re-running the spec resumes from what was written.
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np

from quantatlas.errors import UserError

RAY_MISSING = "ray is not installed: pip install 'quantatlas[ray]'"


class RayMissing(ImportError):
    pass


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayMissing(RAY_MISSING) from None
    return ray


_MODELS: dict = {}  # per worker process: (source, device) -> LoadedModel, loaded once


def _worker_model(source: str, device: str, model_hash: str):
    from quantatlas.models import load_model

    if (source, device) not in _MODELS:
        _MODELS[(source, device)] = load_model(source, device=device)
    lm = _MODELS[(source, device)]
    if lm.model_hash != model_hash:
        raise RuntimeError(f"model {source!r} on this worker has hash {lm.model_hash}, the driver's is {model_hash}")
    return lm


def run_task(spec, name: str, seed: int, es, ref: np.ndarray, lm, model_hash: str, device: str, cpus: int,
             compress: bool, n_bytes: int | None):
    """One arm x seed, inside a Ray worker: (result, per-token KLD, step records), as `measure_arm` returns
    them. `lm` is the driver's model through the object store, or None to load `spec.model` here."""
    import torch

    from quantatlas.context import RunContext
    from quantatlas.measure import calibration_for, measure_arm

    os.environ["OMP_NUM_THREADS"] = str(cpus)
    torch.set_num_threads(cpus)
    if device.startswith("cuda"):
        device = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave this task
    if lm is None:
        lm = _worker_model(spec.model, device, model_hash)
    ctx = RunContext(seed, device, cpus)
    return measure_arm(lm, spec, name, ctx, es, ref, calibration_for(lm, spec, name, es), None, compress, n_bytes)


def task_environment(device: str, task_cpus: int) -> dict:
    """The environment the tasks run in: the driver's, with a task's torch threads in the device name
    (results on CPU depend on them: GPTQ's updates round differently with 1 and 2 threads), so a
    sweep with 1 CPU per task files its runs with a serial run's at 1 thread, and apart from others."""
    from quantatlas.environment import environment

    env = environment(device)
    if not device.startswith("cuda"):
        env["device"] = re.sub(r":\d+threads$", f":{task_cpus}threads", env["device"])
    return env


def _error_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip()


#: seconds to wait for a TCP connection to a cluster address before calling it unreachable
CONNECT_TIMEOUT = 5.0


def _check_reachable(address: str) -> None:
    """A host:port (or ray://host:port) address that nothing answers is a one-line error now, not
    Ray's minutes of retries. `auto` and addresses without a port are left to Ray."""
    import socket

    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    if not 0 < int(port) < 65536:
        raise UserError(f"--ray {address}: port {port} is not a TCP port (1-65535)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        raise UserError(f"--ray {address}: nothing answers at {host}:{port} ({e.strerror or type(e).__name__}); "
                         "is the Ray head running there?") from None


def start_ray(address: str | None, num_cpus: int | None = None):
    """Connect to `address`, or start a quiet local Ray (no dashboard, loopback only, no usage report)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"--ray {address}: cannot connect to a Ray cluster there "
                             f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, _node_ip_address="127.0.0.1")
    return ray, True


def run_spec_ray(spec, json_path=None, db_url: str | None = None, device: str | None = None, progress: bool = False,
                 ledger: bool = True, loaded=None, compress: bool = True, log=print, address: str | None = None,
                 num_cpus: int | None = None, task_cpus: int = 1, retries: int = 1) -> dict:
    """`runner.run_spec` with every arm x seed run as a Ray task; the same document and ledger rows.
    `address`: a Ray cluster (`auto`, `host:6379`, `ray://host:10001`), or None for a local Ray of
    `num_cpus` CPUs (default: all) that is shut down afterwards. Each task gets `task_cpus` CPUs (its
    torch threads) and one GPU when `device` is CUDA. Pass a model in memory as `loaded` (it travels
    through the object store); otherwise each worker loads `spec.model` itself."""
    from quantatlas.progress import Progress
    from quantatlas.runner import Sweep, default_device

    import_ray()  # before loading anything: without ray, one line
    local_cpus = num_cpus or os.cpu_count() or 1
    if address is None and task_cpus > local_cpus:   # Ray would wait forever for a task it cannot place
        raise UserError(f"--task-cpus {task_cpus}: more than the local Ray's {local_cpus} CPUs (--ray-cpus)")
    device = device or default_device()
    sw = Sweep(spec, json_path, db_url, device, ledger, loaded, log, env=task_environment(device, task_cpus))
    spec = sw.spec
    ray, started = start_ray(address, num_cpus)
    try:
        with Progress(progress) as bars:
            ref = np.array(sw.reference(bars))  # in memory: the object store ships it once
            plan = sw.plan()
            to_run = [(name, seed) for name, seed, what, _ in plan if what == "run"]
            task = ray.remote(run_task).options(
                num_cpus=task_cpus, num_gpus=1 if sw.device.startswith("cuda") else 0,
                max_retries=retries, retry_exceptions=True)
            spec_ref, *shared = [ray.put(x) for x in (spec, sw.es, ref, loaded)] if to_run else [None]
            pending = {(name, seed): task.remote(spec_ref, name, seed, *shared, sw.lm.model_hash, sw.device,
                                                 task_cpus, compress, sw.doc["eval_bytes_scored"])
                       for name, seed in to_run}
            advance = bars.task(f"{len(to_run)} runs on Ray", len(to_run))
            runs, failures = {}, []
            for done, (name, seed, what, detail) in enumerate(plan, 1):  # in the plan's order, as the serial loop
                if what == "stored":
                    sw.record(name, seed, detail, stored=True)
                    bars.finished(name, seed, done=done, total=len(plan), note="stored")
                    continue
                if what == "reuse":
                    if (name, detail) not in runs:
                        failures.append({"arm": name, "seed": seed, "error": f"not run: seed {detail} failed"})
                        continue
                    res, per_token = runs[(name, detail)]
                    sw.record(name, seed, dict(res, reused_from_seed=detail), per_token)
                    bars.finished(name, seed, done=done, total=len(plan), note=f"copied from seed {detail}")
                    continue
                try:
                    res, per_token, info = ray.get(pending.pop((name, seed)))
                except Exception as e:  # noqa: BLE001 - a RayTaskError or a lost worker: reported, the others kept
                    failures.append({"arm": name, "seed": seed, "error": _error_line(e)})
                    log(f"{name} seed {seed}: failed after {retries} retries: {failures[-1]['error']}")
                    continue
                finally:
                    if advance:
                        advance(1)
                runs[(name, seed)] = res, per_token
                sw.record(name, seed, res, per_token, info)
                bars.finished(name, seed, seconds=res["seconds"], done=done, total=len(plan))
        if failures:
            sw.doc["failures"] = failures
        return sw.finish()
    finally:
        if started:
            ray.shutdown()
