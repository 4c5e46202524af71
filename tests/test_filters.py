"""The repeated n-gram filter: exact thresholds for every period, no false alarms."""

import numpy as np
import pytest

from olmo2_jax.data.filters import find_repeated_ngram, has_repeated_ngram


def run_in_context(period: int, repeats: int, extra: int = 0) -> np.ndarray:
    """`repeats` copies of a span of `period` distinct tokens (+ `extra` of its first tokens),
    between unrelated tokens that cannot extend the run."""
    span = np.arange(1000, 1000 + period)
    body = np.concatenate([np.tile(span, repeats), span[:extra]])
    return np.concatenate([np.arange(50, 80), body, np.arange(90, 120)]).astype(np.uint32)


@pytest.mark.parametrize("period", range(1, 14))
def test_flags_32_repeats_not_31(period):
    hit = find_repeated_ngram(run_in_context(period, 32))
    assert hit is not None and (hit.start, hit.period, hit.repeats) == (30, period, 32)
    assert not has_repeated_ngram(run_in_context(period, 31))
    assert not has_repeated_ngram(run_in_context(period, 31, extra=period - 1))  # partial copy
    assert has_repeated_ngram(run_in_context(period, 40, extra=period - 1))


def test_periods_beyond_the_limit_and_custom_parameters():
    assert not has_repeated_ngram(run_in_context(14, 40))  # period 14 > max_period 13
    assert has_repeated_ngram(run_in_context(14, 40), max_period=14)
    assert has_repeated_ngram(run_in_context(3, 5), min_repeats=5)
    assert not has_repeated_ngram(run_in_context(3, 4), min_repeats=5)
    # A span with a shorter inner period counts at the inner period: "a a" x16 = "a" x32.
    assert find_repeated_ngram(np.full(32, 7)).period == 1
    with pytest.raises(ValueError, match="min_repeats=1"):
        has_repeated_ngram(np.arange(10), min_repeats=1)


def test_no_false_alarms_on_ordinary_streams():
    rng = np.random.default_rng(0)
    assert not has_repeated_ngram(rng.integers(0, 50_000, 100_000))
    assert not has_repeated_ngram(np.arange(4096))
    assert not has_repeated_ngram(np.array([], np.uint32))
    assert not has_repeated_ngram(np.full(31, 5))
    # A long run but interrupted once every 31 repeats never reaches 32.
    chunk = np.concatenate([np.tile([1, 2, 3], 31), [9]])
    assert not has_repeated_ngram(np.tile(chunk, 20))
