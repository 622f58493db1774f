"""Fluency of generated text as n-gram entropy (ROME / MEMIT, Meng et al. 2022): repetitive text scores low.

Per text: the Shannon entropy (bits) of its word bigram and trigram frequency distributions, combined
as in ROME's `compute_n_gram_entropy`: mean(2/3 * H2, 4/3 * H3), i.e. H2/3 + 2 H3/3. A text that
loops on one phrase has few distinct n-grams and a low score; a text shorter than n words has no
n-grams and H_n = 0. Words: runs of letters/digits (with an inner apostrophe) or single punctuation
marks, kept as written (no case folding) — close to nltk.word_tokenize, which mechanic does
not depend on, so absolute values can differ slightly from ROME's tables.
"""

from __future__ import annotations

import math
import re
from collections import Counter

WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
NS = (2, 3)
WEIGHTS = (2 / 3, 4 / 3)


def words(text: str) -> list[str]:
    """The word and punctuation tokens of `text`."""
    return WORD.findall(text)


def ngram_entropy(tokens: list[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the n-grams of `tokens` (0 when there are none)."""
    if n < 1:
        raise ValueError(f"n-grams need n >= 1, got n={n}.")
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def fluency(text: str, ns=NS, weights=WEIGHTS) -> float:
    """ROME's n-gram entropy of one text: the mean over n in `ns` of weight_n x H_n (bits)."""
    if len(ns) != len(weights) or not ns:
        raise ValueError(f"Give one weight per n-gram order: ns={list(ns)}, weights={list(weights)}.")
    toks = words(text)
    return sum(w * ngram_entropy(toks, n) for n, w in zip(ns, weights)) / len(ns)
