"""Checkpoints on gs:// through Orbax/tensorstore, against a local GCS emulator on 127.0.0.1."""

import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from olmo2_jax import checkpoint, soup, train
from test_soup import params_of
from test_train import losses, small_config, token_file

EMULATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """Starts the emulator (with GCS's generation headers and preconditions, see
    gcs_emulator.py) with bucket `bucket`; points tensorstore and gcsfs at it."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator",
                        reason="pip install 'olmo2_jax[test]' for the GCS emulator")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, EMULATOR, str(port)],
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


def test_emulator_keeps_gcs_generations(gcs):
    """What tensorstore needs (see gcs_emulator.py): a read reports the generation the
    write returned, and a read conditioned on that generation is answered "not modified"."""
    import tensorstore as ts
    kv = ts.KvStore.open({"driver": "gcs", "bucket": "bucket", "path": "gen/"}).result()
    written = kv.write("k", b"v").result().generation
    read = kv.read("k").result()
    assert read.value == b"v" and read.stamp.generation == written
    assert kv.read("k", if_not_equal=written).result().state == "unspecified"


def test_save_restore_keep_last_k_on_gcs(gcs):
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


@pytest.fixture(scope="module")
def gcs_run(gcs, tmp_path_factory):
    """A tiny run whose checkpoints (the whole TrainState) live on gs:// (the workdir is
    local): stopped after step 8, then resumed to 12, keeping the last 2."""
    root = tmp_path_factory.mktemp("gcs_run")
    data = token_file(root / "tokens.npy")
    directory = f"{gcs}/run/checkpoints"
    for steps in (8, 12):
        c = small_config(data, steps=steps)
        c.checkpoint.update(directory=directory, keep=2)
        train.train(c, str(root / "run"))
    return {"root": root, "data": data, "directory": directory}


def test_train_state_on_gcs_resumes_exactly(gcs_run):
    root = gcs_run["root"]
    assert not (root / "run" / "checkpoints").exists()
    manager = checkpoint.make_manager(gcs_run["directory"], keep=2, async_save=False)
    assert manager.all_steps() == [8, 12]
    tree = ocp.StandardCheckpointer().metadata(
        manager.directory / "12" / "state").item_metadata.tree
    manager.close()
    assert len(jax.tree.leaves(tree)) > 40  # params + AdamW moments + counters
    train.train(small_config(gcs_run["data"]), str(root / "straight"))
    a, _ = losses(root / "straight")
    b, rows = losses(root / "run")
    assert [r["step"] for r in rows] == list(range(12))
    assert all(a[s] == b[s] for s in range(12)), {s: (a[s], b[s]) for s in range(12)}


def test_soup_on_gcs(gcs_run, gcs):
    """Ingredients on gs:// (two steps of one run: checkpoint averaging), the soup on gs://."""
    ckpts, out = gcs_run["directory"], f"{gcs}/soup"
    soup.main(["soup", f"--ckpt={ckpts}", f"--ckpt={ckpts}", "--step=8,12", f"--out={out}"])
    (x, _), (y, _), (s, meta) = params_of(ckpts, 8), params_of(ckpts, 12), params_of(out)
    for a, b, c in zip(jax.tree.leaves(x), jax.tree.leaves(y), jax.tree.leaves(s)):
        np.testing.assert_array_equal(c, np.float32(0.5) * a + np.float32(0.5) * b)
    assert [(i["path"], i["step"]) for i in meta["soup"]["ingredients"]] == [(ckpts, 8),
                                                                             (ckpts, 12)]
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        soup.main(["soup", f"--ckpt={ckpts}", f"--ckpt={ckpts}", "--step=8,12", f"--out={out}"])
