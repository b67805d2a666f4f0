"""Push load: N concurrent pushers x M runs each against a local atlas server (uvicorn on
127.0.0.1, started and stopped here), on SQLite and, where Debian's `postgresql` binaries and
psycopg are present, on a PostgreSQL server this script also starts and stops in a temporary
folder. Prints runs per second and checks that every run arrived exactly once; then pushes
everything again (it must add nothing) and times that too.

    python bench/push_load.py [--pushers 8] [--runs 50] [--tokens 8192] [--batch 1]
                              [--backends sqlite,postgresql] [--out bench/results/push_load.json]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantatlas.atlas import ids  # noqa: E402
from quantatlas.atlas.ledger import Ledger  # noqa: E402
from quantatlas.atlas.local_postgres import LocalPostgres, free_port  # noqa: E402
from quantatlas.atlas.tokens import create_token  # noqa: E402

SPEC = {"title": "push load", "hypothesis": "The server takes concurrent pushes without losing or doubling runs.",
        "model": "reference", "seeds": [0], "control": "rtn4",
        "arms": {"rtn4": {"codec": {"uniform": {"bits": 4}}},
                 "had_rtn4": {"codec": {"uniform": {"bits": 4}}, "transforms": [{"hadamard": {}}]}}}
MODEL_HASH, EVAL_FP = "bench-model", "bench-eval"


# ---- the atlas server ------------------------------------------------------------------------

def start_server(url: str, port: int) -> subprocess.Popen:
    code = ("import uvicorn\nfrom quantatlas.web import create_app\n"
            f"uvicorn.run(create_app({url!r}), host='127.0.0.1', port={port}, log_level='warning')\n")
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=path))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/runs/ids", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not answer within 60 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- payloads --------------------------------------------------------------------------------

def build_payloads(exp: str, pushers: int, runs: int, n_tokens: int, batch: int):
    """Per pusher: request bodies (bytes) and the run ids they must create."""
    arms = list(SPEC["arms"])
    out = []
    for i in range(pushers):
        who = f"pusher-{i}"
        env = {"hostname": f"host-{i}", "device": "cpu", "git_commit": "bench", "packages": {"numpy": np.__version__},
               "python": platform.python_version(), "platform": "Linux"}
        key = ids.environment_key(env)
        records, expected = [], []
        for k in range(runs):
            arm, seed = arms[k % 2], k // 2
            tok = np.random.default_rng([i, k]).gamma(0.6, 0.02, n_tokens).astype("<f4")
            raw = tok.tobytes()
            records.append({"type": "run", "experiment": exp, "arm": arm, "seed": seed, "contributor": who,
                            "environment": env, "model_hash": MODEL_HASH, "eval_fingerprint": EVAL_FP,
                            "metrics": {"kld_mean": float(tok.mean(dtype=np.float64)), "bits_per_weight": 4.125},
                            "per_token_kld": {"n": n_tokens, "sha256": hashlib.sha256(raw).hexdigest(),
                                              "zlib_f32_base64": base64.b64encode(zlib.compress(raw, 6)).decode()}})
            expected.append(ids.run_id(exp, arm, seed, key, who, MODEL_HASH, EVAL_FP))
        bodies = [json.dumps({"schema_version": 1, "runs": records[j:j + batch]}).encode()
                  for j in range(0, runs, batch)]
        out.append((who, bodies, expected))
    return out


def push_all(base: str, tokens: dict, payloads) -> dict:
    """Every pusher in its own thread, all at once. Returns wall time, latencies and the sums
    of the server's answers."""
    results, errors, latencies = [], [], []
    lock = threading.Lock()
    start = threading.Barrier(len(payloads) + 1)

    def pusher(who, bodies):
        headers = {"Authorization": f"Bearer {tokens[who]}", "Content-Type": "application/json"}
        with httpx.Client(base_url=base, timeout=300) as client:
            start.wait()
            for body in bodies:
                t0 = time.perf_counter()
                r = client.post("/api/runs", content=body, headers=headers)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if r.status_code == 200:
                        results.append(r.json())
                    else:
                        errors.append(f"{who}: HTTP {r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=pusher, args=(who, bodies)) for who, bodies, _ in payloads]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {"wall_s": wall, "errors": errors, "new": sum(r["runs"] for r in results),
            "existing": sum(r["runs_existing"] for r in results),
            "run_ids": [i for r in results for i in r["run_ids"]],
            "latency_ms": {"p50": float(np.percentile(lat, 50) * 1e3), "p95": float(np.percentile(lat, 95) * 1e3),
                           "max": float(lat.max() * 1e3)} if lat.size else None}


def bench_backend(name: str, url: str, a) -> dict:
    led = Ledger(url)
    exp = led.register_experiment(SPEC)
    tokens = {f"pusher-{i}": create_token(led, f"pusher-{i}") for i in range(a.pushers)}
    led.close()
    payloads = build_payloads(exp, a.pushers, a.runs, a.tokens, a.batch)
    expected = [rid for _, _, rids in payloads for rid in rids]
    body_bytes = sum(len(b) for _, bodies, _ in payloads for b in bodies)
    port = free_port()
    proc = start_server(url, port)
    base = f"http://127.0.0.1:{port}"
    try:
        first = push_all(base, tokens, payloads)
        stored = httpx.get(base + "/api/runs/ids", timeout=300).json()["ids"]
        again = push_all(base, tokens, payloads)
        stored_after = httpx.get(base + "/api/runs/ids", timeout=300).json()["ids"]
    finally:
        stop_server(proc)
    total = a.pushers * a.runs
    with Ledger(url) as led, led.read() as q:
        run_ids = q.run_ids()
        rows = (len(run_ids), len(set(run_ids)))
    checks = {
        "no_errors": not first["errors"] and not again["errors"],
        "every_run_new_once": first["new"] == total and first["existing"] == 0,
        "server_ids_are_the_expected_ids": sorted(stored) == sorted(expected) and len(stored) == total,
        "answers_name_each_run_once": sorted(first["run_ids"]) == sorted(expected),
        "table_rows_distinct": rows[0] == rows[1] == total,
        "second_push_adds_nothing": again["new"] == 0 and again["existing"] == total and sorted(stored_after) == sorted(stored),
    }
    out = {"backend": name, "pushers": a.pushers, "runs_per_pusher": a.runs, "runs_per_request": a.batch,
           "tokens_per_run": a.tokens, "payload_mib": round(body_bytes / 2 ** 20, 2),
           "runs_per_s": round(total / first["wall_s"], 1), "wall_s": round(first["wall_s"], 3),
           "latency_ms": {k: round(v, 1) for k, v in first["latency_ms"].items()},
           "repush_runs_per_s": round(total / again["wall_s"], 1), "repush_wall_s": round(again["wall_s"], 3),
           "checks": checks, "exactly_once": all(checks.values()), "errors": (first["errors"] + again["errors"])[:5]}
    print(f"{name:<11} {a.pushers} pushers x {a.runs} runs ({a.batch}/request, {a.tokens} tokens each): "
          f"{out['runs_per_s']} runs/s ({out['wall_s']} s; latency p50 {out['latency_ms']['p50']} ms, "
          f"p95 {out['latency_ms']['p95']} ms); re-push {out['repush_runs_per_s']} runs/s adds "
          f"{again['new']}; exactly once: {'yes' if out['exactly_once'] else 'NO ' + str(checks)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pushers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=50, help="runs per pusher")
    ap.add_argument("--tokens", type=int, default=8192, help="per-token KLD values per run")
    ap.add_argument("--batch", type=int, default=1, help="runs per request")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "push_load.json"))
    a = ap.parse_args()
    for what in ("pushers", "runs", "tokens", "batch"):
        if getattr(a, what) < 1:
            ap.error(f"--{what} must be at least 1")
    results, skipped = [], {}
    for name in a.backends.split(","):
        name = name.strip()
        if name == "sqlite":
            tmp = Path(tempfile.mkdtemp(prefix="qa-sqlite-"))
            try:
                results.append(bench_backend("sqlite", f"sqlite:///{tmp / 'atlas.db'}", a))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        elif name == "postgresql":
            try:
                pg = LocalPostgres()
                url = pg.start()
            except RuntimeError as e:
                print(f"postgresql: skipped: {e}")
                skipped["postgresql"] = str(e)
                continue
            try:
                results.append(bench_backend("postgresql", url, a))
            finally:
                pg.stop()
        else:
            ap.error(f"--backends: unknown backend {name!r} (sqlite, postgresql)")
    doc = {"bench": "push_load", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "results": results, "skipped": skipped}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    if not all(r["exactly_once"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
