"""Tiny OLMo 2 for CPUs, trained on the embedded default corpus (Python stdlib + pydoc).

    python -m olmo2_jax.main --config=configs/tiny.py --workdir=/tmp/olmo2_tiny

Same architecture as the released models at toy width (GQA on, to exercise it).
Expected: loss falls from ~7.6 (ln 2048) to well under half of it in the default run,
a few minutes on 2 CPU cores (figures in README.md).
"""

from olmo2_jax import config as config_lib


def get_config():
    c = config_lib.base_config()
    m = c.model
    m.vocab_size = m.padded_vocab_size = c.data.corpus_vocab_size = 2048
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_hidden = 192, 4, 6, 2, 512
    m.max_seq_len = c.data.seq_len = 128
    m.dtype = "float32"  # CPUs have no fast bf16 matmul
    m.remat = "none"
    c.train.steps = 300
    c.train.global_batch_size = 32
    c.train.log_every = 10
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    return c
