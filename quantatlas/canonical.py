"""Canonical JSON and its hash: what content-addressed ids are computed over (atlas/ids.py, the
spec's identity). Key order and formatting never matter; integral floats are integers."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any


def canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k).strip(): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"spec holds a non-finite number ({value!r}); ids need finite numbers")
        return int(value) if value.is_integer() else value
    if isinstance(value, str):
        return value.strip()
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
