"""Config validation errors name the key and the fix; params and FLOPs accounting."""

import os
import re
import runpy
import subprocess
import sys

import ml_collections
import pytest

from olmo2_jax import config as config_lib
from olmo2_jax.main import dry_run


def tiny():
    return runpy.run_path("configs/tiny.py")["get_config"]()


@pytest.mark.parametrize("change,devices,message", [
    (dict(model=dict(n_heads=5)), None, "config.model.n_heads=5 does not divide d_model=192"),
    (dict(model=dict(n_kv_heads=4)), None, "config.model.n_kv_heads=4 does not divide n_heads=6"),
    (dict(model=dict(remat="some")), None, "config.model.remat='some'"),
    (dict(data=dict(seq_len=1024)), None, "config.data.seq_len=1024 must be in 1..model.max_seq_len"),
    (dict(train=dict(micro_batch_size=5)), None, "micro_batch_size=5 does not divide global"),
    (dict(optim=dict(schedule="step")), None, "config.optim.schedule='step'"),
    (dict(optim=dict(warmup_steps=300)), None, "warmup_steps=300 must be below the schedule horizon"),
    (dict(mesh=dict(data=-1, fsdp=3)), 8, "the fixed axes (3 devices) do not divide the 8"),
    (dict(mesh=dict(data=2, fsdp=2, tensor=1)), 8, "uses 4 devices but 8 are available"),
    (dict(mesh=dict(data=-1, fsdp=-1)), 8, "at most one of"),
    (dict(train=dict(global_batch_size=12)), 8, "micro-batch of 12 sequences is not divisible by the data-parallel size 8"),
    (dict(mesh=dict(tensor=8, fsdp=1)), 8, "config.mesh.tensor=8 must divide n_heads=6"),
    (dict(model=dict(kernels="pallas")), None, "config.model.kernels='pallas': choose one of"),
    (dict(model=dict(remat="dots_plus")), None, "config.model.remat='dots_plus': choose one of"),
])
def test_validation_errors_are_clear(change, devices, message):
    c = tiny()
    for section, values in change.items():
        c[section].update(values)
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.validate(c, devices)


def test_valid_configs_pass_and_mesh_resolves():
    c = tiny()
    config_lib.validate(c, 8)
    assert config_lib.mesh_shape(c, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    c.mesh.update(dict(data=2, fsdp=-1, tensor=2))
    assert config_lib.mesh_shape(c, 8) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("name,params", [("1b", 1484916736), ("7b", 7298617344),
                                         ("13b", 13716198400), ("32b", 32234279936)])
def test_released_sizes_dry_run(name, params):
    c = runpy.run_path(f"configs/{name}.py")["get_config"]()
    out = dry_run(c)  # builds the model abstractly: nothing is allocated
    assert out["params"] == params


def test_flops_per_token_matches_the_palm_convention():
    c = runpy.run_path("configs/1b.py")["get_config"]()
    # 6 * (all matmul weights incl. LM head, not the embedding) + 12 * L * d * T
    n_matmul = 1484916736 - 100352 * 2048 - (16 * 4 * 2048 + 2048)
    assert config_lib.flops_per_token(c.model, 4096) == 6 * n_matmul + 12 * 16 * 2048 * 4096
    assert config_lib.flops_per_token(c.model, 4096) == 9286189056


def test_readme_config_table_lists_every_key():
    """Every key of base_config() has a row in the README's config table, as `section.key`
    or inside a `section.{a,b}` group; and the table names no key that does not exist."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    table = readme[readme.index("## Config keys"):]
    table = table[:table.index("\n## ")]
    listed = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, re.M):
        for name in re.findall(r"`([a-z_]+(?:\.(?:\{[a-z0-9_,]+\}|[a-z0-9_]+))?)`", cell):
            section, _, keys = name.partition(".")
            listed.update(f"{section}.{k}" if keys else section
                          for k in keys.strip("{}").split(","))
    c = config_lib.base_config()
    keys = {f"{s}.{k}" if isinstance(v, ml_collections.ConfigDict) else s
            for s, v in c.items() for k in (v.keys() if isinstance(v, ml_collections.ConfigDict)
                                            else [None])}
    assert keys - listed == set(), "not in README's config table"
    assert listed - keys == set(), "in README's config table but not a config key"


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args,expected", [
    (["--config.train.steps=abc"],
     r"error: --config\.train\.steps=abc: expected an integer, e\.g\. --config\.train\.steps=300 "
     r"\(the config's value\)"),
    (["--config.model.scan_layers=maybe"],
     r"error: --config\.model\.scan_layers=maybe: expected true or false, .*=true .*"),
    (["--config.train.stepz=3"],
     r"error: --config\.train\.stepz: config\.train has no key 'stepz'; did you mean "
     r"config\.train\.steps\?"),
    (["--config.trian.steps=3"],
     r"error: --config\.trian\.steps: config has no key 'trian'; did you mean config\.train\?"),
    (["--config.train=1"],
     r"error: --config\.train=1: config\.train is a section; set its keys one by one, .*"),
    (["--workdr=/tmp/x"], r"error: unknown flag --workdr; did you mean --workdir\? .*"),
])
def test_bad_flags_print_one_line(args, expected, tmp_path):
    """absl/ml_collections flag errors: one line naming the key, the value and the fix (no
    traceback, no escaped strings), before anything is imported or compiled."""
    out = subprocess.run([sys.executable, "-m", "olmo2_jax.main", "--config=configs/tiny.py",
                          f"--workdir={tmp_path / 'run'}", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert re.fullmatch(expected, lines[0]), lines[0]
    assert "\\n" not in lines[0] and "\\'" not in lines[0]
    assert not (tmp_path / "run").exists()


def test_bad_config_file_prints_one_line(tmp_path):
    """A --config that does not exist names the configs that do; one that raises names the
    line and the error."""
    def run(config):
        out = subprocess.run([sys.executable, "-m", "olmo2_jax.main", f"--config={config}",
                              "--workdir=/tmp/unused", "--config.train.steps=3"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
        return out.stderr.strip()

    assert run("configs/nope.py") == (
        "error: --config=configs/nope.py: no such file; the configs are configs/13b.py, "
        "configs/1b.py, configs/32b.py, configs/7b.py, configs/tiny.py")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return 1 / 0\n")
    assert run(broken) == (f"error: --config={broken}: loading it raised ZeroDivisionError at "
                           "line 2: division by zero")
