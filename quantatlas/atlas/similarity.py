"""Near-identical hypothesis text: Dice coefficient of character trigrams.

Text is normalised first (Unicode NFKC, lower case, every run of non-word characters -> one
space), so punctuation, dashes and spacing do not matter, then padded with a space so
word edges count. Dice = 2 |A ∩ B| / (|A| + |B|) over the two trigram sets: 1 for the same
text, ~0.3 for two different hypotheses about the same techniques, and it degrades smoothly
under small edits (a changed word costs a few trigrams).

DUPLICATE_THRESHOLD 0.8: on the OpenQuant listing the four repeated hypotheses score 1.0 and
the closest pair of distinct hypotheses 0.37.
"""
from __future__ import annotations

import re
import unicodedata

DUPLICATE_THRESHOLD = 0.8
_NON_WORD = re.compile(r"[^\w]+")


def normalise_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text or "").lower()
    return " ".join(_NON_WORD.sub(" ", text).split())


def trigrams(text: str) -> frozenset[str]:
    t = f" {normalise_text(text)} "
    return frozenset(t[i:i + 3] for i in range(len(t) - 2))


def similarity(a: str, b: str) -> float:
    """Dice coefficient of the trigram sets of two texts, in [0, 1]; 0 when either is empty."""
    return dice(trigrams(a), trigrams(b))


def dice(ga: frozenset[str], gb: frozenset[str]) -> float:
    if not ga or not gb:
        return 0.0
    return 2.0 * len(ga & gb) / (len(ga) + len(gb))
