"""OLMo 2 13B, stage-1 pre-training recipe (released shape, paper hyperparameters).

13B (1124): stage 1 over 5T tokens. The published yaml says peak 3e-4; the stage-2 start
(9e-5) suggests 9e-4 was used (see olmo2_reference.md).
Global batch 2048 x 4096 tokens; 596,046 steps; warmup 1000; cosine to 10% of peak.

    python -m olmo2_jax.main --config=configs/13b.py --config.data.paths='/data/*.npy' --workdir=gs://bucket/run
    python -m olmo2_jax.main --config=configs/13b.py --dry_run
"""

from olmo2_jax import config as config_lib


def get_config():
    c = config_lib.apply_preset(config_lib.base_config(), "13b")
    c.train.global_batch_size = 2048
    c.train.steps = 596046
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 1000
    c.optim.decay_steps = 596046  # cosine horizon: 5T tokens
    # Sized for v5p:4x4x8 (128 chips) (launch/aot_compile.py, docs/performance.md); on one
    # H200 use --config.train.micro_batch_size=8.
    c.train.micro_batch_size = 256
    c.checkpoint.every_steps = 1000
    return c
