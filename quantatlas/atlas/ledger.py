"""The ledger API: the store (store.py) with its verdict cache (verdict_cache.py) and its list
and page views (listing.py). Used by the runner, the CLI and the web app; imports no torch.

    led = Ledger(url)                       # None -> $QUANTATLAS_DB -> sqlite:///runs/atlas.db
    exp_id = led.register_experiment(spec_dict, contributor=None)
    if not led.has_run(exp_id, arm, seed, environment_key(env)):
        led.record_run(exp_id, arm, seed, metrics, per_token_kld, env, model_hash, eval_fingerprint)
    led.verdicts(exp_id)

A run is committed in its own transaction and is never overwritten (see store.py). Reads never
write: `rows`, `verdicts` and `describe` use the cached verdicts while they are current and
compute stale ones in memory without storing them. The cache is refreshed when runs are
written (`record_run`, `import_lines`, `merge`; the web app after each push), by
`refresh_verdicts`.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from quantatlas.atlas import io, listing
from quantatlas.atlas.errors import LedgerError
from quantatlas.atlas.ids import environment_key
from quantatlas.atlas.store import Store, default_contributor
from quantatlas.atlas.stored import decode_tokens
from quantatlas.atlas.verdict_cache import STATS_VERSION, VerdictCache

__all__ = ["Ledger", "LedgerError", "environment_key", "decode_tokens", "default_contributor", "STATS_VERSION"]


class Ledger(Store):
    """One ledger database (see `Store`), with its verdicts, list rows and pages."""

    def __init__(self, url: str | None = None, contributor: str | None = None):
        super().__init__(url, contributor)
        self.verdict_cache = VerdictCache(self)

    # ---- writes that make verdicts stale ----------------------------------------------------

    def record_run(self, exp_id: str, arm: str, seed: int, metrics: dict[str, float],
                   per_token_kld: np.ndarray | None, environment: dict, model_hash: str, eval_fingerprint: str,
                   contributor: str | None = None) -> str:
        """Store one finished arm × seed in one transaction; returns the run id. Idempotent.
        The experiment's (and its family's) cached verdicts are refreshed after the write."""
        who = contributor or self.contributor
        rid, new = self.transact(lambda tx: tx.record(exp_id, arm, seed, metrics, per_token_kld, environment,
                                                      model_hash, eval_fingerprint, who))
        if new:
            self.refresh_verdicts([exp_id])
        return rid

    def merge(self, keep: str, other: str) -> dict:
        """Merge experiment `other` into `keep` after a look: `other` becomes an alias that the
        list hides; its tags join `keep`'s; its runs stay with its own spec. A hypothesis-only
        `keep` shows the verdict of its merged experiments."""
        out = self.transact(lambda tx: tx.merge(keep, other))
        self.refresh_verdicts([out["kept"], out["merged"]])
        return out

    def import_lines(self, lines: Iterable[str], source: str = "<input>") -> dict:
        """Import JSON lines (see io.py): every line checked, then all in one transaction."""
        summary = io.import_lines(self, lines, source)
        self.refresh_verdicts(summary.pop("touched"))
        return summary

    def export_records(self) -> Iterable[dict]:
        return io.export_records(self)

    # ---- verdicts ---------------------------------------------------------------------------

    def verdicts(self, exp_id: str) -> list[dict]:
        """One dict per arm with runs (treatments, and the control as 'baseline'): result, p_value,
        p_adjusted, effect, ci, confidence, text, bits_delta, reproductions, ... Cached in the
        ledger and recomputed when the experiment's (or its family's) runs change."""
        return self.verdict_cache.verdicts(exp_id)

    def refresh_verdicts(self, exp_ids: Iterable[str] | None = None) -> list[str]:
        """Recompute and store the cached verdicts of these experiments and of their families'
        (all experiments when None) where they are stale. The ids refreshed."""
        return self.verdict_cache.refresh(exp_ids)

    def verdicts_current(self, exp_id: str) -> bool:
        """Whether the experiment's stored verdicts are current (no run arrived since they were computed)."""
        with self.read() as q:
            return self.verdict_cache.is_current(q, q.experiment(exp_id))

    # ---- the list and the page --------------------------------------------------------------

    def rows(self, tag: str | None = None, model: str | None = None, result: str | None = None,
             include_merged: bool = False) -> list[dict]:
        """The list: one row per experiment, oldest first (see `listing.rows`)."""
        return listing.rows(self, self.verdict_cache, tag, model, result, include_merged)

    def describe(self, exp_id: str) -> dict:
        """Everything `atlas show` prints (see `listing.describe`)."""
        return listing.describe(self, self.verdict_cache, exp_id)
