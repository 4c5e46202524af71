"""Checkpoint soups: the weighted average of the params of several checkpoints.

    python -m olmo2_jax.soup --ckpt=DIR_A --ckpt=DIR_B [--ckpt=...] [--step=S | --step=SA,SB,..]
        [--weights=0.5,0.5] --out=DIR

OLMo 2's final base models average the weights of several anneal runs ("model souping").
Each --ckpt is a checkpoint directory or workdir, local or gs://, of any stage (only the
params are read); the latest step of each by default. The soup is a params-only step-0
checkpoint, like `convert from_hf` writes: `--config.train.init_from=DIR`, `convert to_hf`
and `generate` read it as is; its meta records the ingredients (path, step, weight).

Everything is checked before a tensor is read (two or more ingredients, equal model
configs, weights, a new --out). The average is taken in fp32 on the mesh, one ingredient
at a time: memory holds the running sum and one ingredient, each sharded over all devices.
"""

from __future__ import annotations

import json
import math
import sys

import jax
import jax.numpy as jnp

from olmo2_jax import checkpoint, sharding

# Model keys that change how the params are computed with, not the params themselves.
COMPUTE_ONLY_KEYS = ("dtype", "remat", "attention")


class SoupError(ValueError):
    """The ingredients cannot be souped; the message names what and how to fix it."""


def parse_weights(text: str | None) -> list[float] | None:
    """"a,b,..." -> [a, b, ...]; None or "" -> None (equal weights)."""
    if not text:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise SoupError(f"--weights={text!r}: expected comma-separated numbers, e.g. 0.5,0.5")


def normalise_weights(weights: list[float] | None, n: int) -> list[float]:
    """`n` positive weights scaled to sum 1 (None = equal)."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise SoupError(f"--weights gives {len(weights)} weights for {n} checkpoints")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise SoupError(f"--weights={','.join(map(str, weights))}: every weight must be a "
                        "positive number")
    total = sum(weights)
    return [w / total for w in weights]


def parse_steps(text: str | None, n: int) -> list[int | None]:
    """"" = the latest step of each; "S" = step S of each; "S1,...,Sn" = one per checkpoint."""
    if not text:
        return [None] * n
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise SoupError(f"--step={text!r}: expected a step or one step per --ckpt, e.g. 8,12")
    if len(steps) == 1:
        return steps * n
    if len(steps) != n:
        raise SoupError(f"--step={text!r} gives {len(steps)} steps for {n} checkpoints")
    return steps


def _model_and_tokenizer(meta: dict) -> dict:
    config = checkpoint.config_from_meta(meta)  # today's defaults fill keys added since
    out = {f"model.{k}": v for k, v in config.model.to_dict().items()
           if k not in COMPUTE_ONLY_KEYS}
    out["data.tokenizer"] = config.data.tokenizer
    return out


def check_ingredients(metas: list[dict], names: list[str]) -> None:
    """Raises SoupError naming the first key whose value differs from the first checkpoint's."""
    ref = _model_and_tokenizer(metas[0])
    for meta, name in zip(metas[1:], names[1:]):
        other = _model_and_tokenizer(meta)
        for key in sorted(set(ref) | set(other)):
            if ref.get(key) != other.get(key):
                raise SoupError(
                    f"config.{key} differs: {ref.get(key)!r} in {names[0]}, {other.get(key)!r} "
                    f"in {name}; only checkpoints of the same model can be souped")


def average_params(directories: list[str], steps: list[int], weights: list[float], cfg,
                   mesh):
    """sum_i weights[i] * params_i in fp32, leaf by leaf, reading one checkpoint at a time;
    returned in cfg.param_dtype with the model's shardings on `mesh`."""
    first = jax.jit(lambda x, w: w * x.astype(jnp.float32))
    add = jax.jit(lambda acc, x, w: acc + w * x.astype(jnp.float32), donate_argnums=0)
    total = None
    for directory, step, weight in zip(directories, steps, weights):
        params = checkpoint.load_params(directory, cfg, mesh, step)
        w = jnp.float32(weight)
        if total is None:
            total = jax.tree.map(lambda x: first(x, w), params)
        else:
            total = jax.tree.map(lambda a, x: add(a, x, w), total, params)
        del params  # freed before the next ingredient is read
    return jax.tree.map(lambda a: a.astype(cfg.param_dtype), total)


def soup(ckpts: list[str], out: str, *, steps: list[int | None] | None = None,
         weights: list[float] | None = None, mesh=None) -> str:
    """Writes the weighted average of the params of `ckpts` (weights default equal and are
    normalised) as a new checkpoint at `out`; returns `out`."""
    n = len(ckpts)
    if n < 2:
        raise SoupError(f"a soup needs at least 2 checkpoints (got {n}): pass --ckpt twice or more")
    steps = list(steps) if steps is not None else [None] * n
    if len(steps) != n:
        raise SoupError(f"{len(steps)} steps for {n} checkpoints")
    weights = normalise_weights(weights, n)
    out = checkpoint.check_new_dir(out)
    directories, metas = [], []
    for path, step in zip(ckpts, steps):
        directory = checkpoint.resolve_dir(path)
        directories.append(directory)
        metas.append(checkpoint.read_meta(directory, step))
    names = [f"{d} (step {m['step']})" for d, m in zip(directories, metas)]
    check_ingredients(metas, names)
    cfg = checkpoint.model_config(metas[0])
    if mesh is None:
        mesh = sharding.inference_mesh()
    params = average_params(directories, [m["step"] for m in metas], weights, cfg, mesh)
    meta = {"config": metas[0]["config"],
            "soup": {"ingredients": [{"path": d, "step": m["step"], "weight": w}
                                     for d, m, w in zip(directories, metas, weights)]}}
    if "hf" in metas[0]:  # token ids and dtype for to_hf, as for the first ingredient
        meta["hf"] = metas[0]["hf"]
    return checkpoint.write_params(out, params, meta, step=0,
                                   tokenizer_files=checkpoint.tokenizer_files(directories[0]))


def main(argv=None) -> None:
    from absl import flags

    f = flags.FlagValues()
    flags.DEFINE_multi_string("ckpt", [], "An ingredient: checkpoint dir or workdir (local or "
                              "gs://); repeat for each.", flag_values=f)
    flags.DEFINE_string("step", None, "Step of every ingredient, or one per --ckpt "
                        "(comma-separated); default the latest of each.", flag_values=f)
    flags.DEFINE_string("weights", None, "One positive weight per --ckpt, comma-separated, "
                        "normalised to sum 1; default equal.", flag_values=f)
    flags.DEFINE_string("out", None, "New checkpoint directory (local or gs://).",
                        flag_values=f)
    try:
        f(sys.argv if argv is None else argv)
    except flags.Error as e:
        sys.exit(f"error: {e}")
    # Bad input, a damaged ingredient (CheckpointError) or a full disk: one line on stderr.
    checkpoint.run_cli("soup", lambda: _main(f), out=f.out)


def _main(f) -> None:
    if not f.out:
        raise SoupError("--out is required")
    out = soup(f.ckpt, f.out, steps=parse_steps(f.step, len(f.ckpt)),
               weights=parse_weights(f.weights))
    meta = checkpoint.read_meta(out)
    print(json.dumps({"out": out, "ingredients": meta["soup"]["ingredients"]}))


if __name__ == "__main__":
    main()
