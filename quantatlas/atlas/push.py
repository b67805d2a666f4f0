"""Push local runs to a shared atlas server and pull its runs here (HTTP, via httpx).

    push(led, "https://atlas.example.org", token)   # this contributor's runs the server lacks
    pull(led, "https://atlas.example.org")          # the server's runs this ledger lacks

Both are idempotent: what the other side holds already is not sent again, and a record that
arrives twice is stored once (run ids are content-addressed). A push sends only the runs of
the token's contributor (the server refuses others'); it goes in batches of about
`batch_bytes`, each written all-or-nothing by the server.

Local runs are recorded under $QUANTATLAS_CONTRIBUTOR or the login name (`Store.contributor`),
which need not be the name the server's token was made for. `as_token_owner=True` also pushes
the runs recorded under this ledger's contributor name, as the token's contributor (the server
stores them under that name, so their ids there differ from the local ones); without it a push
that finds none of the token's runs says why and how to fix it (the summary's "hint").
"""
from __future__ import annotations

import json
import shlex
from collections import Counter
from typing import TYPE_CHECKING, Iterable

import httpx

from quantatlas.atlas import ids
from quantatlas.atlas.io import experiment_record, run_records
from quantatlas.errors import UserError

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

BATCH_BYTES = 8 << 20          # a push request's approximate size (the server's default limit is 64 MiB)
BATCH_TOKENS = 1 << 24         # per-token KLD values in one request (the server's default limit is 2**25)
PULL_CHUNK = 500               # runs fetched per request
KNOWN_CHUNK = 20_000           # ids asked per request
TIMEOUT_S = 300.0


class RemoteError(UserError):
    """A push or pull that cannot be done: a bad URL, an unreachable server, a missing token, or
    the server's refusal (its HTTP status and reason); one line."""


def _base(url: str, what: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise RemoteError(f"{what} {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
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
        raise RemoteError(f"cannot reach {url}: {e}") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text[:300]
        if isinstance(detail, list):          # FastAPI's schema errors: say where and what
            detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail[:5])
        raise RemoteError(f"{url}{path}: HTTP {r.status_code}: {detail}")
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


def _runs_to_push(q, owners: list[tuple[str, str]], who: str, local: str | None) -> dict[str, str]:
    """{id the run has (or will have) on the server: local run id} for the runs of `who`, and
    when `local` is given, the runs recorded here under `local`, as `who` would hold them (a run's
    id includes its contributor). `owners`: (run id, contributor) of every local run. `who`'s own
    run wins where both would get one id."""
    out = {rid: rid for rid, name in owners if name == who}
    if local is not None:
        theirs = [rid for rid, name in owners if name == local]
        for i in range(0, len(theirs), PULL_CHUNK):       # in chunks: a stored run carries its per-token KLD
            for r in q.runs_by_id(theirs[i:i + PULL_CHUNK]):
                rs = r.run_set
                target = ids.run_id(r.experiment_id, r.arm, r.seed, rs.environment_key, who, rs.model_hash,
                                    rs.eval_fingerprint)
                out.setdefault(target, r.id)
    return out


def no_runs_hint(who: str, local: str, holders: dict[str, int], as_token_owner: bool) -> str:
    """One line: why a push found no run to send, and the two ways to fix it."""
    held = ", ".join(f"{name!r} ({n})" for name, n in sorted(holders.items(), key=lambda x: (-x[1], x[0])))
    source = local if local in holders else max(sorted(holders), key=lambda n: holders[n])
    env = "" if source == local else f"QUANTATLAS_CONTRIBUTOR={shlex.quote(source)} "
    why = (f"no run here is recorded as {local!r}" if as_token_owner else
           f"the token pushes as {who!r} and no run here is recorded under that name")
    return (f"0 runs pushed: {why} (runs here are recorded as {held}; a run is recorded under "
            f"$QUANTATLAS_CONTRIBUTOR or the login name, now {local!r}); fix: set QUANTATLAS_CONTRIBUTOR="
            f"{shlex.quote(who)} so runs are recorded as {who!r}, or push the runs of {source!r} as {who!r} with "
            f"`{env}quantatlas push --as-token-owner ...`")


def push(led: Ledger, url: str, token: str | None, client: httpx.Client | None = None,
         batch_bytes: int = BATCH_BYTES, as_token_owner: bool = False) -> dict:
    """Send this ledger's runs by the token's contributor that the server lacks (and the
    experiments they belong to, and experiments the server lacks). `as_token_owner`: also the
    runs recorded here under `led.contributor`, stored by the server as the token's contributor.
    Returns counts; "as_token_owner" is {"local": name, "runs": pushed, "existing": already there}
    when runs were re-attributed, and "hint" one line when no run went although the ledger holds
    runs."""
    url = _base(url, "--to")
    if not token:
        raise RemoteError("--token is missing (or set $QUANTATLAS_TOKEN); the server's admin creates one with "
                          "`quantatlas atlas token create NAME`")
    http = _client(url, None, client)
    try:
        who = _call(http, "GET", "/api/whoami", url, token).json()["contributor"]
        local_name = led.contributor
        reattribute = as_token_owner and local_name != who
        with led.read() as q:
            owners = q.run_contributors()
            exp_records = {e.id: experiment_record(q, e) for e in q.experiments()}
            targets = _runs_to_push(q, owners, who, local_name if reattribute else None)
        holders = dict(Counter(name for _, name in owners))
        pushing = {who, local_name} if reattribute else {who}
        mine = sorted(targets)
        have_runs, have_exps = _known(http, url, token, mine, list(exp_records))
        missing = [targets[t] for t in mine if t not in have_runs]
        runs = run_records(led, missing)
        runless = [e for e in exp_records if e not in have_exps]
        moved = sum(1 for r in runs if r["contributor"] != who)
        total = {"contributor": who, "experiments": 0, "experiments_existing": 0, "runs": 0, "runs_existing": 0,
                 "renamed": {}, "kept": {},
                 "skipped_other_contributors": sum(n for name, n in holders.items() if name not in pushing),
                 "batches": 0, "local_contributors": holders, "as_token_owner": None, "hint": None}
        if reattribute and holders.get(local_name):
            total["as_token_owner"] = {"local": local_name, "runs": moved,
                                       "existing": sum(1 for t, rid in targets.items() if rid != t) - moved}
        if not targets and holders:
            total["hint"] = no_runs_hint(who, local_name, holders, as_token_owner)
        params = {"as_token_owner": "true"} if reattribute else None
        for payload in _batches(exp_records, runs, runless, batch_bytes):
            try:
                got = _call(http, "POST", "/api/runs", url, token, json=payload, params=params).json()
            except ValueError as e:
                raise RemoteError(f"{e} (pushed {total['runs']} run(s) in {total['batches']} batch(es) before this; "
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
    url = _base(url, "--from")
    http = _client(url, None, client)
    try:
        server_ids = _call(http, "GET", "/api/runs/ids", url, token).json()["ids"]
        with led.read() as q:
            have = set(q.run_ids())
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
