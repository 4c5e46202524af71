"""Mix files in the original format and the per-source settings that mix them.

A mix file lists `label,path` lines (blank lines and `#` comments skipped); `{TOKENIZER}`
in a path stands for the tokenizer id (`allenai/dolma2-tokenizer` for dolma2), relative
paths are joined to a base (a local folder or `gs://bucket/prefix`), and local paths may
be globs or folders prepared by prepare_data. Lines with the same label form one source.
"""

from __future__ import annotations

import dataclasses
import glob
import os

PLACEHOLDER = "{TOKENIZER}"


@dataclasses.dataclass(frozen=True)
class Source:
    label: str
    paths: tuple[str, ...]


def is_remote(path: str) -> bool:
    return "://" in path


def directory_files(folder: str) -> list[str]:
    """The token files of a local folder: the shards its prepare_data manifest.json lists,
    in order, else every *.npy in it, sorted; a ValueError if it holds none."""
    from olmo2_jax.data.pipeline import read_manifest

    manifest = read_manifest(folder)
    if manifest is not None:
        shards = [os.path.join(folder, s["file"]) for s in manifest["shards"]]
    else:
        shards = sorted(glob.glob(os.path.join(glob.escape(folder), "*.npy")))
    if not shards:
        raise ValueError(f"{folder!r} is a folder with no token files: no shards in a "
                         "manifest.json and no *.npy. Point at the --output_dir prepare_data "
                         "wrote, or at the token files themselves.")
    return shards


def _join(base: str, path: str) -> str:
    if not base or is_remote(path) or os.path.isabs(path):
        return path
    return base.rstrip("/") + "/" + path


def read_mix(mix_file: str, *, tokenizer_id: str, base: str = "") -> list[Source]:
    """Sources of a mix file, in order of first appearance; globs expanded (sorted)."""
    if not os.path.isfile(mix_file):
        raise FileNotFoundError(f"Mix file not found: {mix_file!r} (config.data.mix)")
    found: dict[str, list[str]] = {}
    with open(mix_file, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            label, sep, path = (part.strip() for part in line.partition(","))
            if not sep or not label or not path or "," in path:
                raise ValueError(f"{mix_file}:{lineno}: expected `label,path`, got {line!r}")
            if PLACEHOLDER in path and not tokenizer_id:
                raise ValueError(f"{mix_file}:{lineno}: the path has {PLACEHOLDER} but no "
                                 "tokenizer id is set (config.data.tokenizer)")
            path = _join(base, path.replace(PLACEHOLDER, tokenizer_id))
            if any(ch in path for ch in "*?["):
                if is_remote(path):
                    raise ValueError(f"{mix_file}:{lineno}: globs work for local paths only; "
                                     f"list the files of {path!r} one per line")
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"{mix_file}:{lineno}: {path!r} matches no file "
                                            "(is config.data.mix_base right?)")
                found.setdefault(label, []).extend(matches)
            elif not is_remote(path) and os.path.isdir(path):
                try:
                    found.setdefault(label, []).extend(directory_files(path))
                except ValueError as e:
                    raise ValueError(f"{mix_file}:{lineno}: {e}") from e
            else:
                found.setdefault(label, []).append(path)
    if not found:
        raise ValueError(f"{mix_file} lists no `label,path` line")
    return [Source(label, tuple(paths)) for label, paths in found.items()]


def parse_label_values(text: str, key: str, labels: list[str]) -> dict[str, float]:
    """`"web=0.7,code=0.3"` -> {"web": 0.7, "code": 0.3}; every label must be a source."""
    out: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        label, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or not number >= 0:
            raise ValueError(f"{key}: {item!r} is not `label=<non-negative number>`")
        if label.strip() not in labels:
            raise ValueError(f"{key}: unknown source {label.strip()!r}; the mix has {labels}")
        out[label.strip()] = number
    return out


def source_weights(sources: list[Source], weights: str) -> list[float]:
    """Sampling shares per source from `label=w,...` (all listed, not all zero), normalised."""
    labels = [s.label for s in sources]
    given = parse_label_values(weights, "config.data.weights", labels)
    missing = [label for label in labels if label not in given]
    if missing:
        raise ValueError(f"config.data.weights: no weight for {missing}; give every source one "
                         "(0 leaves it out)")
    total = sum(given.values())
    if total <= 0:
        raise ValueError("config.data.weights: the weights sum to 0")
    return [given[label] / total for label in labels]


def source_repeats(sources: list[Source], repeats: str) -> list[float]:
    """Times each source's windows appear per epoch (default 1; 2 = Dolmino-style doubling)."""
    labels = [s.label for s in sources]
    given = parse_label_values(repeats, "config.data.repeats", labels)
    return [given.get(label, 1.0) for label in labels]
