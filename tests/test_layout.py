"""Packaging hazards that break other libraries in the same process."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("folder", ["bench", "launch", "kernels", "olmo2_jax", "olmo2_jax/data"])
def test_no_module_shadows_the_stdlib(folder):
    # `python bench/x.py` puts bench/ first on sys.path: a bench/profile.py once replaced
    # the stdlib `profile` there, and torch (cProfile) and so transformers failed to import.
    names = {f[:-3] for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py")}
    assert not names & set(sys.stdlib_module_names), sorted(names & set(sys.stdlib_module_names))


def test_importing_kernels_runs_nothing():
    # transformers probes for Hugging Face's top-level `kernels` package by importing it.
    code = "import sys, kernels; assert 'jax' not in sys.modules; print(kernels.__all__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
