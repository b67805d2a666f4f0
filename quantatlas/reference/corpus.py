"""Corpus: Python standard-library sources, byte-tokenised.

Files are split into train / validation / eval by a hash of their path relative to the
stdlib root, which keeps the split stable as files are added or removed elsewhere.

What is measured is fixed: the eval and validation splits, and a calibration sample of
the train split, were cut once from Python 3.11.7's standard library with this module's
rule and ship with the package (`quantatlas/reference/data/`, see data.py; splits.py gives
the streams by split), so every Python gives the same tokens and the same eval fingerprint.
Only training reads the running interpreter's standard library (`stdlib_tokens("train")`);
nothing is downloaded either way.
"""
from __future__ import annotations

import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np

BOS, EOS = 256, 257
VOCAB_SIZE = 258
SPLITS = ("train", "validation", "eval")          # of the live standard library


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def split_of(relpath: str) -> str:
    """90 % train, 5 % validation, 5 % eval, by the first byte of sha256(relpath)."""
    bucket = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:4], "big") % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "eval"


@lru_cache(maxsize=None)
def corpus_files(split: str) -> tuple[Path, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = stdlib_root()
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        if split_of(rel) == split:
            files.append(p)
    return tuple(files)


def stream_of(files) -> np.ndarray:
    """For each file in the order given: BOS + its bytes + EOS."""
    parts = []
    for p in files:
        data = p.read_bytes()
        parts.append(np.array([BOS], dtype=np.int64))
        parts.append(np.frombuffer(data, dtype=np.uint8).astype(np.int64))
        parts.append(np.array([EOS], dtype=np.int64))
    return np.concatenate(parts)


@lru_cache(maxsize=None)
def _split_tokens(split: str) -> np.ndarray:
    out = stream_of(corpus_files(split))
    out.setflags(write=False)
    return out


def stdlib_tokens(split: str, max_tokens: int | None = None) -> np.ndarray:
    """A split of the running interpreter's standard library (differs between Python versions)."""
    toks = _split_tokens(split)
    return toks if max_tokens is None else toks[:max_tokens]


def eval_fingerprint(tokens: np.ndarray, ctx: int, score_all: bool = False) -> str:
    """Hash of the exact token stream and windowing that a KLD evaluation scores."""
    h = hashlib.sha256()
    h.update(f"ctx={ctx};score_all={score_all};n={len(tokens)};".encode())
    h.update(np.ascontiguousarray(tokens, dtype="<i8").tobytes())  # little-endian on every machine
    return h.hexdigest()[:16]
