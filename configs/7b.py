"""OLMo 2 7B, stage-1 pre-training recipe (released shape, paper hyperparameters).

7B (1124): stage 1 over ~3.9T tokens, cosine horizon 5T.
Global batch 1024 x 4096 tokens; 929,832 steps; warmup 2000; cosine to 10% of peak.

    python -m olmo2_jax.main --config=configs/7b.py --config.data.paths='/data/*.npy' --workdir=gs://bucket/run
    python -m olmo2_jax.main --config=configs/7b.py --dry_run
"""

from olmo2_jax import config as config_lib


def get_config():
    c = config_lib.apply_preset(config_lib.base_config(), "7b")
    c.train.global_batch_size = 1024
    c.train.steps = 929832
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2000
    c.optim.decay_steps = 1192093  # cosine horizon: 5T tokens
    # Sized for v5p:4x4x4 (64 chips) (launch/aot_compile.py, docs/performance.md); on one
    # H200 use --config.train.micro_batch_size=8.
    c.train.micro_batch_size = 128
    c.checkpoint.every_steps = 1000
    return c
