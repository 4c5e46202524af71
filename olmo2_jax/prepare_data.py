"""Prepare token shards: `python -m olmo2_jax.prepare_data --input=... --output_dir=...`.

    python -m olmo2_jax.prepare_data --input='data/*.jsonl.zst' --output_dir=out --tokenizer=dolma2
    python -m olmo2_jax.prepare_data --input=embedded --output_dir=out --tokenizer=embedded

`--input=embedded` is the embedded default corpus; `--tokenizer=embedded` its
sentencepiece model (any tokenizer works on any input). See olmo2_jax/data/prepare.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from olmo2_jax.data import prepare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m olmo2_jax.prepare_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="files or globs of .jsonl/.jsonl.gz/.jsonl.zst (repeat or comma-separate)"
                        ", or 'embedded'")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--tokenizer", default="dolma2",
                   help="dolma2 | dolma2:<ranks file> | hf:<tokenizer.json> | "
                        "sentencepiece:<model> | embedded")
    p.add_argument("--text_field", default="text")
    p.add_argument("--max_tokens_per_shard", type=int, default=prepare.Options.max_tokens_per_shard)
    p.add_argument("--ngram_max_period", type=int, default=13)
    p.add_argument("--ngram_min_repeats", type=int, default=32, help="0 keeps every document")
    p.add_argument("--workers", type=int, default=0, help="processes; 0 = one per core")
    p.add_argument("--embedded_max_bytes", type=int, default=None)
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = prepare.Options(
        tokenizer=args.tokenizer, text_field=args.text_field,
        max_tokens_per_shard=args.max_tokens_per_shard, ngram_max_period=args.ngram_max_period,
        ngram_min_repeats=args.ngram_min_repeats, workers=args.workers,
        progress=not args.no_progress)
    try:
        m = prepare.prepare(args.input, args.output_dir, options,
                            embedded_max_bytes=args.embedded_max_bytes)
    except (ValueError, FileNotFoundError, FileExistsError, prepare.OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: m[k] for k in ("documents", "tokens", "dropped", "malformed_lines",
                                 "unreadable_inputs", "seconds")}
    summary["shards"] = len(m["shards"])
    for line in m["unreadable_inputs"]:  # the rest of those files was skipped
        print(f"warning: {line}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
