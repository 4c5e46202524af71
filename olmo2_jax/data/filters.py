"""The repeated n-gram filter of OLMo 2: a span of 1..13 tokens repeated >= 32 times in a row.

Such runs (table borders, spam, degenerate generations) cause loss spikes. Documents with
one are dropped when data is prepared; at load time an instance with one gets no loss.

A span of `period` tokens repeated k times in a row is exactly a stretch where
x[i] == x[i + period] holds for (k - 1) * period consecutive i; the longest such stretch
is read off the gaps between mismatches, one vectorised pass per period.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RepeatedNgram:
    start: int  # index of the first token of the run
    period: int  # length of the repeated span
    repeats: int  # whole repetitions in the run


def find_repeated_ngram(tokens: np.ndarray, max_period: int = 13,
                        min_repeats: int = 32) -> RepeatedNgram | None:
    """The first-found run (smallest period) of a span of 1..max_period tokens repeated
    >= min_repeats times in a row, or None."""
    if max_period < 1 or min_repeats < 2:
        raise ValueError(f"max_period={max_period} must be >= 1 and min_repeats={min_repeats} "
                         ">= 2 (one occurrence is not a repetition)")
    x = np.asarray(tokens)
    n = x.shape[0]
    for period in range(1, max_period + 1):
        need = (min_repeats - 1) * period  # matches x[i] == x[i + period] in a row
        if n < need + period:
            break
        mismatch = np.flatnonzero(x[period:] != x[:-period])
        bounds = np.concatenate(([-1], mismatch, [n - period]))
        gaps = np.diff(bounds) - 1  # lengths of the stretches of matches
        best = int(np.argmax(gaps))
        if gaps[best] >= need:
            run = int(gaps[best])
            return RepeatedNgram(start=int(bounds[best]) + 1, period=period,
                                 repeats=(run + period) // period)
    return None


def has_repeated_ngram(tokens: np.ndarray, max_period: int = 13, min_repeats: int = 32) -> bool:
    return find_repeated_ngram(tokens, max_period, min_repeats) is not None
