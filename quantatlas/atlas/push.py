"""Push local runs to a shared atlas server and pull its runs here (HTTP, via httpx).

    push(led, "https://atlas.example.org", token)   # this contributor's runs the server lacks
    pull(led, "https://atlas.example.org")          # the server's runs this ledger lacks

Both are idempotent: what the other side holds already is not sent again, and a record that
arrives twice is stored once (run ids are content-addressed). A push sends only the runs of
the token's contributor (the server refuses others'); it goes in batches of about
`batch_bytes`, each written all-or-nothing by the server.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Iterable

import httpx
from sqlalchemy import select

from quantatlas.atlas.models import Contributor, Experiment, Run, RunSet

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

BATCH_BYTES = 8 << 20          # a push request's approximate size (the server's default limit is 64 MiB)
BATCH_TOKENS = 1 << 24         # per-token KLD values in one request (the server's default limit is 2**25)
PULL_CHUNK = 500               # runs fetched per request
KNOWN_CHUNK = 20_000           # ids asked per request
TIMEOUT_S = 300.0


def _base(url: str, what: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"{what} {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
    return url.rstrip("/")


def _client(url: str, token: str | None, client: httpx.Client | None) -> httpx.Client:
    if client is not None:
        return client
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT_S)


def _call(client: httpx.Client, method: str, path: str, url: str, token: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = client.request(method, url + path, headers=headers, **kw)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {url}: {e}") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text[:300]
        if isinstance(detail, list):          # FastAPI's schema errors: say where and what
            detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail[:5])
        raise ValueError(f"{url}{path}: HTTP {r.status_code}: {detail}")
    return r


def _known(client, url, token, runs: list[str], experiments: list[str]) -> tuple[set, set]:
    have_runs, have_exps = set(), set()
    for i in range(0, max(len(runs), len(experiments), 1), KNOWN_CHUNK):
        body = {"runs": runs[i:i + KNOWN_CHUNK], "experiments": experiments[i:i + KNOWN_CHUNK]}
        got = _call(client, "POST", "/api/known", url, token, json=body).json()
        have_runs |= set(got["runs"])
        have_exps |= set(got["experiments"])
    return have_runs, have_exps


def _batches(exp_records: dict[str, dict], runs: list[dict], extra_exps: list[str], limit: int,
             token_limit: int = BATCH_TOKENS) -> Iterable[dict]:
    """Payloads of about `limit` bytes and at most `token_limit` per-token values: runs with the
    experiment records they refer to."""
    exps, batch, size, tokens = dict.fromkeys(extra_exps), [], 0, 0
    for r in runs:
        n = len(json.dumps(r, separators=(",", ":")))
        k = (r.get("per_token_kld") or {}).get("n") or 0
        if batch and (size + n > limit or tokens + k > token_limit):
            yield {"schema_version": 1, "experiments": [exp_records[e] for e in exps], "runs": batch}
            exps, batch, size, tokens = {}, [], 0, 0
        batch.append(r)
        exps.setdefault(r["experiment"])
        size += n
        tokens += k
    if batch or exps:
        yield {"schema_version": 1, "experiments": [exp_records[e] for e in exps], "runs": batch}


def push(led: Ledger, url: str, token: str | None, client: httpx.Client | None = None,
         batch_bytes: int = BATCH_BYTES) -> dict:
    """Send this ledger's runs by the token's contributor that the server lacks (and the
    experiments they belong to, and experiments the server lacks). Returns counts."""
    from quantatlas.atlas.io import experiment_record
    from quantatlas.web.records import run_records

    url = _base(url, "--to")
    if not token:
        raise ValueError("--token is missing (or set $QUANTATLAS_TOKEN); the server's admin creates one with "
                         "`quantatlas atlas token create NAME`")
    http = _client(url, None, client)
    try:
        who = _call(http, "GET", "/api/whoami", url, token).json()["contributor"]
        with led._reading() as s:
            local = s.execute(select(Run.id, Contributor.name).join(RunSet, Run.run_set_id == RunSet.id)
                              .join(Contributor, RunSet.contributor_id == Contributor.id)).all()
            exp_records = {e.id: experiment_record(s, e) for e in s.scalars(
                select(Experiment).order_by(Experiment.created_at, Experiment.id))}
        mine = sorted(rid for rid, name in local if name == who)
        others = sum(1 for _, name in local if name != who)
        have_runs, have_exps = _known(http, url, token, mine, list(exp_records))
        missing = [rid for rid in mine if rid not in have_runs]
        runs = run_records(led, missing)
        runless = [e for e in exp_records if e not in have_exps]
        total = {"contributor": who, "experiments": 0, "experiments_existing": 0, "runs": 0, "runs_existing": 0,
                 "renamed": {}, "kept": {}, "skipped_other_contributors": others, "batches": 0}
        for payload in _batches(exp_records, runs, runless, batch_bytes):
            try:
                got = _call(http, "POST", "/api/runs", url, token, json=payload).json()
            except ValueError as e:
                raise ValueError(f"{e} (pushed {total['runs']} run(s) in {total['batches']} batch(es) before this; "
                                 f"this batch wrote nothing)") from None
            total["batches"] += 1
            for k in ("experiments", "experiments_existing", "runs", "runs_existing"):
                total[k] += got[k]
            total["renamed"].update(got.get("renamed") or {})
            total["kept"].update(got.get("kept") or {})
        return total
    finally:
        if client is None:
            http.close()


def pull(led: Ledger, url: str, token: str | None = None, client: httpx.Client | None = None) -> dict:
    """Fetch the server's experiments and the runs this ledger lacks, and import them."""
    from quantatlas.web.records import all_run_ids

    url = _base(url, "--from")
    http = _client(url, None, client)
    try:
        server_ids = _call(http, "GET", "/api/runs/ids", url, token).json()["ids"]
        have = set(all_run_ids(led))
        missing = [rid for rid in server_ids if rid not in have]
        exp_lines = [line for line in _call(http, "GET", "/api/records/experiments", url, token).text.splitlines()
                     if line.strip()]
        total = {"experiments": 0, "existing": 0, "runs": 0, "runs_existing": 0, "merged": 0, "renamed": {}}
        chunks = [missing[i:i + PULL_CHUNK] for i in range(0, len(missing), PULL_CHUNK)] or [[]]
        for i, chunk in enumerate(chunks):
            run_lines = []
            if chunk:
                run_lines = [line for line in _call(http, "POST", "/api/records/runs", url, token,
                                                    json={"ids": chunk}).text.splitlines() if line.strip()]
            got = led.import_lines(exp_lines + run_lines, source=url)
            for k in ("runs", "runs_existing", "merged"):
                total[k] += got[k]
            if i == 0:
                total["experiments"], total["existing"] = got["experiments"], got["existing"]
            total["renamed"].update(got["renamed"])
        return total
    finally:
        if client is None:
            http.close()
