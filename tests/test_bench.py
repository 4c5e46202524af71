"""The transformers side of bench/train_step.py's comparison: same shape as our config."""

import math
import runpy

import pytest

from bench import transformers_step
from olmo2_jax import config as config_lib
from olmo2_jax import convert


def test_transformers_step_runs_our_configs_shape():
    r = transformers_step.run("configs/tiny.py", seq=32, batch=2, steps=1, warmup=1,
                              compile_=False, device="cpu")
    c = runpy.run_path("configs/tiny.py")["get_config"]()
    assert r["params"] == config_lib.count_params(c.model)["total"]
    assert r["tok_s"] > 0 and r["batch"] == 2 and r["seq"] == 32
    # a freshly initialised model predicts ~uniformly: CE ~ ln(vocab)
    assert abs(r["loss"] - math.log(c.model.padded_vocab_size)) < 0.5


def test_transformers_step_refuses_a_model_of_another_shape(monkeypatch):
    real = convert.hf_config_from_model

    def one_layer_short(m, ids, dtype):
        hf = real(m, ids, dtype)
        hf["num_hidden_layers"] -= 1
        return hf
    monkeypatch.setattr(convert, "hf_config_from_model", one_layer_short)
    with pytest.raises(ValueError, match="parameters, our config configs/tiny.py"):
        transformers_step.run("configs/tiny.py", seq=32, batch=2, steps=1, warmup=0,
                              compile_=False, device="cpu")


def test_kernel_profile_reads_gemm_flops_and_source_from_hlo():
    """The profile's per-op TFLOP/s rests on this: FLOPs of dots (plain and inside fusions)
    and of cuBLAS custom calls, from the optimized HLO text."""
    import jax
    import jax.numpy as jnp

    from bench.kernel_profile import hlo_ops

    def f(a, b, c):
        return jax.nn.relu(a @ b) @ c

    args = [jnp.ones(s, jnp.bfloat16) for s in ((64, 32), (32, 48), (48, 16))]
    ops = hlo_ops(jax.jit(f).lower(*args).compile().as_text())
    flops = sorted({v["flops"] for v in ops.values() if v["flops"]})
    assert flops == [2 * 64 * 16 * 48, 2 * 64 * 48 * 32]
    assert all("dot_general" in v["op_name"] for v in ops.values() if v["flops"])
    gpu_line = ('  %custom-call.7 = (bf16[4096,2048]{1,0}, s8[33554432]{0}) '
                'custom-call(%p.1, %p.2),'
                ' custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":'
                '{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
                '"rhs_contracting_dimensions":["0"]}}}')
    text = ("ENTRY %main (p.1: bf16[4096,8192], p.2: bf16[8192,2048]) -> bf16[4096,2048] {\n"
            "  %p.1 = bf16[4096,8192]{1,0} parameter(0)\n"
            "  %p.2 = bf16[8192,2048]{1,0} parameter(1)\n"
            + gpu_line + "\n}\n")
    assert hlo_ops(text)["custom-call.7"]["flops"] == 2 * 4096 * 2048 * 8192


def test_kernel_profile_folds_layers_into_one_row_per_source():
    import collections

    from bench.kernel_profile import _by_source

    ops = {f"custom-call.{i}": {"shape": "bf16[4096,2048]", "flops": 1e12,
                                "op_name": f"jit(train_step)/layers_{i}/mlp/dot_general"}
           for i in range(2)}
    ops["fusion.1"] = {"shape": "bf16[4096,8192]", "flops": 0.0, "op_name": "layers_0/mlp/mul"}
    keys = {f"{k} [kernel]": k for k in ops}
    keys["custom-call.1 [splitk_reduce]"] = "custom-call.1"  # a second kernel of one GEMM
    us = collections.Counter({"custom-call.0 [kernel]": 1500.0, "custom-call.1 [kernel]": 1650.0,
                              "custom-call.1 [splitk_reduce]": 50.0, "fusion.1 [kernel]": 100.0})
    rows = _by_source(us, collections.Counter(dict.fromkeys(us, 1)), keys, ops, 3300.0, 10)
    assert rows[0]["source"] == "jit(train_step)/layers_*/mlp/dot_general"
    assert rows[0]["count"] == 3 and rows[0]["us"] == 3200.0
    assert rows[0]["tflops"] == 625.0  # 2e12 FLOPs in 3.2 ms, the helper kernel's not twice
    assert "tflops" not in rows[1]


def test_rmsnorm_bench_checks_then_times_both(capsys):
    """bench/rmsnorm on the CPU through Pallas' interpreter: XLA's and our rows per shape,
    ours checked against XLA's forward, dx and dscale first."""
    from bench import rmsnorm

    rows = rmsnorm.bench_shape("qk_norm", (16, 4, 16), (4, 16), interpret=True)
    assert [r["impl"] for r in rows] == ["xla", "ours"] and all(r["ms"] > 0 for r in rows)
    assert max(rows[1]["max_rel_err"]) < 1e-2
    saved = dict(rmsnorm.rmsnorm_gpu.TUNING)
    swept = rmsnorm.sweep("qk_norm", (16, 4, 16), (4, 16), interpret=True)
    assert len(swept) == 24 and {r["tuning"]["rows"] for r in swept} == {2, 4, 8, 16}
    assert rmsnorm.rmsnorm_gpu.TUNING == saved
    rows = rmsnorm.bench_rope(16, interpret=True)  # QK-norm + RoPE: XLA's pair, then ours
    assert [r["impl"] for r in rows] == ["xla", "ours"] and rows[0]["x"] == [1, 16, 16, 128]
    assert max(rows[1]["max_rel_err"]) < 1e-2


def test_swiglu_bench_checks_then_times_both():
    """bench/swiglu on the CPU through Pallas' interpreter: fwd+bwd and bwd rows for XLA's
    autodiff and ours, each with its error against fp32 autodiff (ours checked first)."""
    from bench import swiglu

    rows = swiglu.bench(8, F=2048, interpret=True)
    assert [(r["impl"], r["what"]) for r in rows] == [
        ("xla", "fwd+bwd"), ("xla", "bwd"), ("ours", "fwd+bwd"), ("ours", "bwd")]
    assert all(r["ms"] > 0 for r in rows) and max(rows[-1]["max_rel_err_vs_fp32"]) < 1e-2
    rows = swiglu.bench_mlp(8, D=64, F=256, interpret=True)  # GEMMs (ops.dense) + gate
    assert [r["impl"] for r in rows] == ["xla", "ours"]
    assert all(r["ms"] > 0 and max(r["max_rel_err_vs_xla"]) < 2e-2 for r in rows)


def test_gpu_clock_summarises_nvidia_smi_samples(tmp_path, monkeypatch):
    """bench/gpu_clock reads nvidia-smi's CSV (clock, power, throttle reasons) from its
    background process: median and p10 clock, median power, share at the software power cap;
    it skips lines it cannot parse, and does nothing without nvidia-smi."""
    import os
    import stat

    from bench.gpu_clock import GpuClock

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '1980, 650.5, 0x0000000000000004\\n"
                    "1410, 700.0, 0x0000000000000004\\n[N/A], [N/A], [N/A]\\n"
                    "1725, 600.0, 0x0000000000000000\\n1800, 610.0, 0x0000000000000000\\n'\n"
                    "exec sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with GpuClock() as clock:
        import time
        time.sleep(0.5)
    assert clock.summary() == {"sm_mhz_median": 1762, "sm_mhz_p10": 1410,
                               "power_w_median": 630, "power_capped": 0.5, "samples": 4}
    with GpuClock(enabled=False) as clock:
        pass
    assert clock.summary() == {}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with GpuClock() as clock:
        pass
    assert clock.summary() == {}


def test_train_step_bench_times_a_config_on_the_cpu():
    """bench/train_step's row for the tiny config: the real step compiled and timed, MFU from
    the config's FLOPs; the clock summary only where a GPU and nvidia-smi are."""
    from bench import train_step

    r = train_step.bench("configs/tiny.py", seq=32, overrides="train.global_batch_size=8",
                         steps=3, warmup=1)
    assert r["batch"] == 8 and r["seq"] == 32 and r["step_s"] > 0 and r["tok_s"] > 0
    assert r["step_s_spread"][0] <= r["step_s"] <= r["step_s_spread"][1]
    assert 0 < r["loss"] < 20 and "gpu_clock" not in r


def test_train_step_times_transformers_at_each_variants_batch(tmp_path, monkeypatch, capsys):
    """transformers runs at the variant's own global batch (once per distinct batch, before
    any variant), or at --transformers-batch; not beside a variant of another model shape.
    Each variant's ratio is to the run at its batch, and the table names that batch."""
    import json
    import sys

    from bench import train_step

    variants = [("a", "train.global_batch_size=8"), ("b", "train.global_batch_size=4"),
                ("c", "train.global_batch_size=8,model.remat=full"), ("d", "model.n_layers=1"),
                ("e", "model.no_such_key=1")]
    assert train_step.transformers_batches("configs/tiny.py", 32, variants, None) == [
        8, 4, 8, None, None]
    assert train_step.transformers_batches("configs/tiny.py", 32, variants, 2) == [
        2, 2, 2, None, None]

    asked = []

    def fake_transformers(args, batch):
        asked.append(batch)
        return {"impl": "transformers+compile", "batch": batch, "seq": args.seq,
                "tok_s": 100 * batch, "step_s": 0.01, "step_s_spread": [0.01, 0.01],
                "peak_gib": 0.0}

    def fake_bench(config_path, seq, overrides, steps, warmup):
        assert (steps, warmup) == (3, 1)
        c = train_step.variant_config(config_path, seq, overrides)
        B = c.train.global_batch_size
        return {"batch": B, "seq": seq, "step_s": 0.01, "tok_s": 200 * B, "mfu": 0.0,
                "peak_gib": 0.0, "compile_s": 0.0, "loss": 1.0, "step_s_spread": [0.01, 0.01]}

    monkeypatch.setattr(train_step, "_transformers_step", fake_transformers)
    monkeypatch.setattr(train_step, "bench", fake_bench)
    out = tmp_path / "ts.json"
    monkeypatch.setattr(sys, "argv", [
        "train_step.py", "--config=configs/tiny.py", "--seq=32", "--steps=3", "--warmup=1",
        "--transformers=compile", f"--out={out}",
        *(f"--variant={n}:{o}" for n, o in variants[:3])])
    train_step.main()
    assert asked == [8, 4]
    res = json.loads(out.read_text())
    assert [t["batch"] for t in res["transformers"]] == [8, 4]
    assert [(r["transformers_batch"], r["vs_transformers"]) for r in res["results"]] == [
        (8, 2.0), (4, 2.0), (8, 2.0)]
    table = capsys.readouterr().out.split("\n\n")[-1]
    assert "2.00 @b4" in table and "transformers+compile b4" in table

    monkeypatch.setattr(sys, "argv", ["train_step.py", "--steps=2"])
    with pytest.raises(SystemExit):
        train_step.main()
    assert "--steps must be >= 3" in capsys.readouterr().err


def test_generate_bench_times_both_sides_warm_at_the_same_shapes(tmp_path, capsys):
    """bench/generate at the tiny shape on the CPU: transformers' static cache (in its own
    process) and our Generator, each median and min/max of 3 timed calls after a warm-up at
    the timed shapes, and the roofline from --hbm_gb_s; the table comes last."""
    import json

    from bench import generate

    out = tmp_path / "gen.json"
    res = generate.main(["--tiny", "--hbm_gb_s=100", f"--out={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    rows = {r["impl"]: r for r in res["results"]}
    assert list(rows) == ["transformers", "olmo2_jax"] and rows["transformers"]["mode"] == "static"
    for r in rows.values():
        assert "error" not in r, r
        assert len(r["all_seconds"]) == 3
        lo, hi = r["seconds_spread"]
        assert lo <= r["seconds"] <= hi and r["new_tokens_per_s"] == 4 * 16 / r["seconds"]
    assert 0 < rows["olmo2_jax"]["prefill_seconds"] < rows["olmo2_jax"]["seconds"]
    assert res["env"]["transformers"] and res["env"]["jax_device"] == "cpu"
    assert res["roofline_new_tokens_per_s"] == 4 * 100e9 / res["bytes_per_decode_step"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("HBM roofline")


def test_generate_bench_warms_up_before_timing_and_knows_the_cards():
    from bench import generate

    calls = []
    times = generate.timed(lambda: len(calls), calls.append, lambda: None, warmup=2, repeats=3)
    assert calls == [0, 1, 2, 3, 4] and len(times) == 3
    assert generate.hbm_gb_s("NVIDIA H100 80GB HBM3") == 3350
    assert generate.hbm_gb_s("NVIDIA H200") == 4800
    assert generate.hbm_gb_s("NVIDIA GH200 480GB") is None and generate.hbm_gb_s("cpu") is None
    with pytest.raises(SystemExit):
        generate.parse(["--tiny", "--repeats=2", "--out=/dev/null"])


def test_xent_bench_checks_then_times_each_pass(monkeypatch):
    """bench/xent on the CPU through Pallas' interpreter: XLA's and our rows for each pass,
    ours checked against XLA first; the sweep restores the tuning it changed."""
    from bench import xent

    monkeypatch.setitem(xent.xent_gpu.TUNING, "lse", {"rows": 4, "cols": 1024, "num_warps": 4})
    rows = xent.bench(16, 2048, interpret=True)
    assert [(r["pass"], r["impl"]) for r in rows] == [
        (p, i) for i in ("xla", "ours") for p in ("lse", "grad", "both")]
    assert all(r["ms"] > 0 and r["gb_s"] > 0 for r in rows)
    assert max(r["rel_err"] for r in rows if r["impl"] == "ours") < 1e-2
    saved = {k: dict(v) for k, v in xent.xent_gpu.TUNING.items()}
    monkeypatch.setattr(xent.itertools, "product", lambda *a: [(2, 1024, 4), (4, 4096, 8)])
    swept = xent.sweep(16, 2048, interpret=True)
    assert [(r["pass"], r["tuning"]) for r in swept] == [("lse", [2, 1024, 4]),
                                                         ("grad", [2, 1024, 4])]
    assert xent.xent_gpu.TUNING == saved
