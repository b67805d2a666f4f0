"""Bits per byte: the model's code length of the eval text per byte of that text.

    bpb = sum over scored tokens of nll_t / ln 2  /  bytes of the scored tokens' text

the metric parameter-golf reports (there on its validation text). It does not depend on the
tokenizer, so models with different vocabularies compare; Δbpb = bpb(Q) - bpb(base) is the
damage of quantization in those units.

Bytes are counted over exactly the tokens that are scored (eval/windows.py: the second half of
every window by default), so numerator and denominator cover the same text:
- the byte-level reference model (no tokenizer): token ids 0..255 are one byte each, BOS and
  EOS (256, 257) are zero bytes (they stand for no text; predicting them still costs bits);
- a tokenizer: the UTF-8 length of the decoded text of each window's scored tokens (decoded
  as one run per window, special tokens skipped, so multi-byte characters split across tokens
  count once).
"""
from __future__ import annotations

import math

import numpy as np

from quantatlas.eval.kld import TokenMetrics

BYTE_VOCAB = 256   # reference vocabulary: ids below this are bytes, the rest (BOS, EOS) are not text


def scored_bytes(targets: np.ndarray, windows: int, tokenizer=None) -> int:
    """UTF-8 bytes of the scored tokens' text. `targets`: the scored token ids in order,
    `windows` runs of equal length (one per eval window)."""
    targets = np.asarray(targets).reshape(-1)
    if tokenizer is None:
        return int(np.count_nonzero((targets >= 0) & (targets < BYTE_VOCAB)))
    if windows < 1 or len(targets) % windows:
        raise ValueError(f"scored_bytes: {len(targets)} targets do not split into {windows} windows")
    total = 0
    for run in targets.reshape(windows, -1):
        text = tokenizer.decode(run.tolist(), skip_special_tokens=True)
        total += len(text.encode("utf-8"))
    return total


def eval_bytes(es, tokenizer=None) -> int:
    """Bytes of the scored text of an EvalSet."""
    return scored_bytes(es.targets().numpy(), es.windows.shape[0], tokenizer)


def bits_per_byte(nll: np.ndarray, n_bytes: int) -> float:
    """Total code length in bits of the tokens (NLLs in nats) per byte of their text."""
    if n_bytes <= 0:
        raise ValueError(f"bits_per_byte: the scored text has {n_bytes} bytes")
    return float(np.sum(np.asarray(nll, dtype=np.float64))) / math.log(2) / n_bytes


def bpb_metrics(m: TokenMetrics, n_bytes: int) -> dict[str, float]:
    """bpb of the quantized model, of the base model on the same tokens, and their difference."""
    q, base = bits_per_byte(m.nll_q, n_bytes), bits_per_byte(m.nll_base, n_bytes)
    return {"bpb": q, "bpb_base": base, "delta_bpb": q - base}
