"""OLMo 2 32B, stage-1 pre-training recipe (released shape, paper hyperparameters).

32B (0325): GQA 40/8, stage 1 over ~6.06T tokens, cosine horizon 6.5T.
Global batch 2048 x 4096 tokens; 722,408 steps; warmup 2000; cosine to 10% of peak.

    python -m olmo2_jax.main --config=configs/32b.py --config.data.paths='/data/*.npy' --workdir=gs://bucket/run
    python -m olmo2_jax.main --config=configs/32b.py --dry_run
"""

from olmo2_jax import config as config_lib


def get_config():
    c = config_lib.apply_preset(config_lib.base_config(), "32b")
    c.train.global_batch_size = 2048
    c.train.steps = 722408
    c.optim.lr = 6e-4
    c.optim.warmup_steps = 2000
    c.optim.decay_steps = 774860  # cosine horizon: 6.5T tokens
    # Sized for v5p:8x8x8 (512 chips) (launch/aot_compile.py, docs/performance.md); on one
    # H200 use --config.train.micro_batch_size=8.
    c.train.micro_batch_size = 512
    c.checkpoint.every_steps = 1000
    return c
