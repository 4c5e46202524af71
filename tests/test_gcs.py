"""Checkpoints on gs:// through Orbax/tensorstore, against a local GCS emulator on 127.0.0.1."""

import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from olmo2_jax import checkpoint, train
from test_train import losses, small_config, token_file

EMULATOR = shutil.which("gcp-storage-emulator") or os.path.join(
    os.path.dirname(sys.executable), "gcp-storage-emulator")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """Starts the emulator with bucket `bucket`; points tensorstore and gcsfs at it."""
    pytest.importorskip("gcsfs")
    if not os.path.exists(EMULATOR):
        pytest.skip("gcp-storage-emulator is not installed (pip install 'olmo2_jax[test]')")
    port = _free_port()
    proc = subprocess.Popen([EMULATOR, "start", "--host", "127.0.0.1", "--port", str(port),
                             "--in-memory", "--default-bucket", "bucket"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the GCS emulator did not start")
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {"TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
           "STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon", "NO_GCE_CHECK": "true",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield "gs://bucket"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


def test_save_restore_keep_last_k_on_gcs(gcs):
    # Few arrays: the emulator (2026.7.19) corrupts OCDBT manifests under many concurrent
    # conditional writes ("Malformed StorageGeneration" at ~40 arrays); real GCS does not.
    mesh = jax.make_mesh((8,), ("fsdp",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    state = {"w": jax.device_put(jnp.arange(64.0).reshape(16, 4), sharding),
             "b": jnp.ones(3, jnp.bfloat16)}
    manager = checkpoint.make_manager(f"{gcs}/unit", keep=2, async_save=True)
    for step in (1, 2, 3):
        checkpoint.save(manager, step, jax.tree.map(lambda x: x * step, state), None,
                        {"step": step})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
    manager.close()
    # A step whose save was cut off (no commit marker: on GCS Orbax writes in place and
    # commits with commit_success.txt) is never listed.
    from etils import epath
    partial = epath.Path(f"{gcs}/unit/4/state")
    partial.mkdir(parents=True)
    (partial / "_METADATA").write_text("{")
    manager = checkpoint.make_manager(f"{gcs}/unit", keep=2, async_save=True)
    assert manager.latest_step() == 3
    restored, meta = checkpoint.restore(manager, 3, checkpoint.abstract_like(state), None)
    manager.close()
    assert meta == {"step": 3}
    np.testing.assert_array_equal(restored["w"], np.arange(64.0).reshape(16, 4) * 3)
    assert restored["w"].sharding == sharding and restored["b"].dtype == jnp.bfloat16


def test_gcs_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(train.config_lib.ConfigError, match="checkpoint.directory=gs://b/run"):
        train.train(small_config(token_file(tmp_path / "t.npy")), "gs://b/run")
