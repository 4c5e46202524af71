"""The transformers `Olmo2ForCausalLM` training step at one of our configs' shapes: the
comparison that `bench/train_step.py --transformers=compile` runs in the same call.

    python bench/transformers_step.py --config=configs/1b.py --seq=4096 --batch=8 --compile

The model is built from our `config.model` through `convert.hf_config_from_model` (the
mapping our Hugging Face export uses), so both sides have the same shape and parameter
count (checked before timing). The step is what a transformers user runs: bf16 autocast,
SDPA attention, the library's cross-entropy (no z-loss), backward, torch AdamW (fused on
CUDA) with our optimizer settings, optionally under `torch.compile`. As on our side,
`--warmup` steps (compiles included) run at the timed shape first, then `--steps` steps are
timed one by one, each on a batch of fresh random tokens already on the device; it reports
their median and spread (min, max). Prints one JSON line.
It runs in its own process because JAX keeps most of the GPU's memory once it starts.
"""

from __future__ import annotations

import argparse
import json
import runpy
import statistics
import time


def run(config_path: str, seq: int, batch: int, steps: int, warmup: int, compile_: bool,
        device: str | None = None) -> dict:
    import torch
    import transformers

    from olmo2_jax import config as config_lib
    from olmo2_jax.convert import hf_config_from_model

    c = runpy.run_path(config_path)["get_config"]()
    m = c.model
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf = hf_config_from_model(m, {}, "float32")
    hf.update(max_position_embeddings=max(seq, m.max_seq_len), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**hf)).to(device)
    ours = config_lib.count_params(m)["total"]
    theirs = sum(p.numel() for p in model.parameters())
    if theirs != ours:
        raise ValueError(f"transformers model has {theirs:,} parameters, our config "
                         f"{config_path} {ours:,}: the shapes do not match")
    o = c.optim
    opt = torch.optim.AdamW(model.parameters(), lr=float(o.lr), betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=float(o.weight_decay), fused=device == "cuda")
    fwd = torch.compile(model) if compile_ else model
    gen = torch.Generator(device="cpu").manual_seed(0)

    def tokens():
        return torch.randint(0, m.vocab_size, (batch, seq), generator=gen).to(device)

    def step(x):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step(tokens())
    sync()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        x = tokens()
        sync()
        t = time.perf_counter()
        loss = step(x)
        sync()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {"impl": "transformers" + ("+compile" if compile_ else ""),
            "transformers": transformers.__version__, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else device,
            "batch": batch, "seq": seq, "params": theirs, "step_s": round(dt, 4),
            "tok_s": round(batch * seq / dt), "peak_gib": round(peak, 1),
            "warmup_s": round(warmup_s, 1), "loss": round(float(loss), 4),
            "step_s_spread": [round(min(times), 4), round(max(times), 4)]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/1b.py")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (>= 3; median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps at the timed shape")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    args = ap.parse_args(argv)
    if args.steps < 3 or args.warmup < 1:
        ap.error("--steps must be >= 3 and --warmup >= 1 (warm calls only, median of >= 3)")
    print(json.dumps(run(args.config, args.seq, args.batch, args.steps, args.warmup,
                         args.compile, args.device)), flush=True)


if __name__ == "__main__":
    main()
