"""The reference corpus's token streams by split: what is measured comes from the data shipped with
the package (`data.py`: eval, validation, and calib, a sample of train), the same on every Python;
only training reads the running interpreter's standard library (`corpus.py`).

Each stream is, for each source file in path order, BOS + its bytes + EOS.
"""
from __future__ import annotations

import numpy as np

from quantatlas.reference import corpus, data

FIXED_SPLITS = ("validation", "eval", "calib")     # shipped with the package (calib: a sample of train)


def fixed_tokens(split: str, max_tokens: int | None = None) -> np.ndarray:
    """A shipped split (`validation`, `eval`, or `calib`, the calibration sample of train): the
    same tokens on every Python."""
    if split not in FIXED_SPLITS:
        raise ValueError(f"unknown fixed split {split!r}; expected one of {FIXED_SPLITS}")
    toks = data.tokens(split)
    return toks if max_tokens is None else toks[:max_tokens]


def corpus_tokens(split: str, max_tokens: int | None = None) -> np.ndarray:
    """The reference corpus: `eval`, `validation` and `calib` are the shipped fixed splits;
    `train` (training only) is the running interpreter's standard library."""
    if split == "train":
        return corpus.stdlib_tokens(split, max_tokens)
    return fixed_tokens(split, max_tokens)
