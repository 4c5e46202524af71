"""Measures the conversion and generation parity figures quoted in docs/convert_generate.md.

    PYTHONPATH=$PWD python bench/parity.py --out=/tmp/parity_cpu.json

On a tiny random transformers Olmo2 with GQA (fp32, CPU): max |logit difference| of our
forward vs transformers after `from_hf`; whether `to_hf` gives back identical tensors and
logits; greedy tokens vs transformers `generate` for batched prompts of different lengths;
max |difference| between KV-cache decoding and a full forward (teacher-forced, via the
log-probabilities of the generated tokens).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--new_tokens", type=int, default=32)
    a = p.parse_args()
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from olmo2_jax import checkpoint, convert, sharding
    from olmo2_jax.generate import Generator
    from olmo2_jax.model import Transformer
    from tests.test_convert import tiny_hf_model

    tmp = tempfile.mkdtemp()
    hf = tiny_hf_model(seed=0)
    hf.save_pretrained(f"{tmp}/hf", max_shard_size="100KB")
    ckpt = convert.from_hf(f"{tmp}/hf", f"{tmp}/ck")
    meta = checkpoint.read_meta(ckpt)
    cfg = checkpoint.model_config(meta)
    cfg = cfg.__class__(**{**cfg.__dict__, "dtype": jnp.float32})
    mesh = sharding.make_mesh(checkpoint.config_from_meta(meta))
    params = checkpoint.load_params(ckpt, cfg, mesh)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 64))
    with jax.set_mesh(mesh), torch.no_grad():
        ours = np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, tokens))
        ref = hf(torch.from_numpy(tokens)).logits.numpy()
    res = {"from_hf_max_abs_logit_diff_fp32": float(np.abs(ours - ref).max()),
           "logit_scale_max_abs": float(np.abs(ref).max())}

    convert.to_hf(ckpt, f"{tmp}/out", max_shard_bytes=60_000)
    back = transformers.Olmo2ForCausalLM.from_pretrained(f"{tmp}/out").eval()
    a_sd, b_sd = hf.state_dict(), back.state_dict()
    with torch.no_grad():
        same_logits = bool(torch.equal(back(torch.from_numpy(tokens)).logits,
                                       hf(torch.from_numpy(tokens)).logits))
    res["to_hf_tensors_identical"] = all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)
    res["to_hf_logits_identical"] = same_logits

    prompts = [[11, 42, 7], list(range(300, 317)), [5] * 9, list(range(60, 66)), [400] * 30]
    gen = Generator(cfg, params, mesh)
    out, logprobs = gen(prompts, max_new_tokens=a.new_tokens, return_logprobs=True)
    match, kv_diff = [], 0.0
    for prompt, new, lp in zip(prompts, out, logprobs):
        with torch.no_grad():
            r = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                            do_sample=False, max_new_tokens=a.new_tokens, pad_token_id=0)
        match.append(new == r[0, len(prompt):].tolist())
        full = np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray([prompt + new])))
        full_lp = jax.nn.log_softmax(full[0, len(prompt) - 1:-1])[np.arange(len(new)), new]
        kv_diff = max(kv_diff, float(np.abs(np.asarray(full_lp) - np.asarray(lp)).max()))
    res["greedy_rows_equal_transformers"] = f"{sum(match)}/{len(match)}"
    res["greedy_new_tokens_per_row"] = a.new_tokens
    res["prompt_lengths"] = [len(x) for x in prompts]
    res["kv_cache_vs_full_forward_max_abs_logprob_diff"] = kv_diff
    res["env"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "host": platform.node(), "jax": jax.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "command": " ".join(["python"] + sys.argv)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
