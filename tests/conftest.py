"""8 fake CPU devices for sharding tests; set before any JAX computation."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture
def xla_gemms(monkeypatch):
    """Call it to stand XLA in for the Mosaic GPU GEMM (kernels/matmul_mgpu.py has no CPU
    interpreter for wgmma), so what is tested is the wiring around it: which operands and
    layout each forward/backward GEMM is asked for."""
    def stand_in():
        from kernels import matmul_mgpu
        monkeypatch.setattr(matmul_mgpu, "_matmul", lambda a, b, c, ta, tb, _: (
            matmul_mgpu.matmul_reference(a, b, ta, tb, c)))
    return stand_in
