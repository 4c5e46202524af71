"""Loader throughput: tokens/s per host core for 4096-token instances from a weighted mix,
with the repeated n-gram loss mask and document masking on.

    PYTHONPATH=. python bench/loader.py                 # writes its data under /tmp
    PYTHONPATH=. python bench/loader.py --batches=200 --read_threads=1

Two synthetic sources of dolma2-sized ids (documents of log-normal length ending in EOS,
1% of them with a repeated span) are mixed 0.7/0.3. The figure that matters is tokens per
CPU-second of this process (all its threads), i.e. per host core: the machine may be
shared, so wall-clock throughput is reported too but not used for the verdict.
The target: one H200 trains the 1B at ~57k tokens/s, so a host core must feed > 20x that.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np

from olmo2_jax.data import pipeline
from olmo2_jax.data.mixture import Source
from olmo2_jax.data.tokenizer import DOLMA2_EOS_ID

TARGET_TOKENS_PER_S = 1_200_000  # the bar: > 20 x ~57k tokens/s (one H200, 1B)


def make_source(path: str, num_tokens: int, seed: int) -> str:
    if os.path.exists(path) and os.path.getsize(path) == 4 * num_tokens:
        return path
    rng = np.random.default_rng(seed)
    out = np.empty(num_tokens, dtype="<u4")
    pos = 0
    while pos < num_tokens:
        n = int(min(rng.lognormal(6.0, 1.0) + 1, num_tokens - pos))  # median ~400 tokens
        doc = rng.integers(0, 100_256, n, dtype=np.uint32)
        if rng.random() < 0.01 and n > 200:
            span = doc[:3].copy()
            doc[50 : 50 + 3 * 40] = np.tile(span, 40)[: min(120, n - 50)]
        doc[-1] = DOLMA2_EOS_ID
        out[pos : pos + n] = doc
        pos += n
    out.tofile(path)
    return path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", default="/tmp/olmo2_jax_loader_bench")
    p.add_argument("--tokens_per_source", type=int, default=32 * 2**20)
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=64, help="instances per host batch")
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--read_threads", type=int, default=1)
    args = p.parse_args()

    os.makedirs(args.data_dir, exist_ok=True)
    sources = [Source(label, (make_source(os.path.join(args.data_dir, f"{label}.npy"),
                                          args.tokens_per_source, seed),))
               for seed, label in enumerate(("web", "code"))]
    instance = pipeline.InstanceOptions(eos_id=DOLMA2_EOS_ID, document_masking=True,
                                        ngram_max_period=13, ngram_min_repeats=32)
    it = pipeline.make_iterator(
        sources=sources, weights=[0.7, 0.3], seq_len=args.seq_len, global_batch_size=args.batch,
        seed=0, vocab_size=100_278, read_threads=args.read_threads, instance=instance)
    for _ in range(args.warmup):
        next(it)
    masked = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.batches):
        b = next(it)
        masked += int((b["loss_mask"].sum(axis=1) == 0).sum())
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    it.close()
    assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    tokens = args.batches * args.batch * args.seq_len
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({cpu_model()}, {os.cpu_count()} cores, "
                   f"load average {os.getloadavg()[0]:.2f})",
        "seq_len": args.seq_len, "batch": args.batch, "batches": args.batches,
        "read_threads": args.read_threads,
        "instances_masked_by_ngram_filter": masked,
        "tokens_per_cpu_second": round(tokens / cpu),
        "tokens_per_wall_second": round(tokens / wall),
        "target_tokens_per_cpu_second": TARGET_TOKENS_PER_S,
        "passes": tokens / cpu > TARGET_TOKENS_PER_S,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
