"""Where training metrics go: metrics.jsonl, TensorBoard event files, a progress bar."""

from __future__ import annotations

import json
import os

import jax

# Dense bf16 peak FLOP/s per chip, by substrings of `device.device_kind` (lower case).
_PEAK_FLOPS = (
    ("h100", 989e12), ("h200", 989e12), ("h800", 989e12), ("gh200", 989e12),
    ("a100", 312e12), ("b200", 2250e12),
    ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v6", 918e12), ("v4", 275e12),
)


def peak_flops_per_device(device=None) -> float | None:
    """Vendor peak for MFU, or None where unknown (CPU): MFU is then reported as null."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key, flops in _PEAK_FLOPS:
        if key in kind:
            return flops
    return None


class MetricsWriter:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard.

    Only process 0 writes. On resume, lines for steps the checkpoint does not cover are
    dropped first: the resumed run recomputes those steps, so the file stays one line per
    step of the surviving trajectory.
    """

    def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate_after(start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        from tqdm.auto import tqdm
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, start_step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("step", -1) < start_step]
        if len(keep) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: None if v is None else float(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for k, v in row.items():
            if k != "step" and v is not None:
                self._tb.add_scalar(f"train/{k}", v, step)
        self._bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)

    def rewind(self, step: int) -> None:
        """Drops the lines of steps >= `step` (after a rollback to that checkpoint)."""
        if not self.enabled:
            return
        self._file.close()
        self._truncate_after(step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._bar.n = step
        self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self._bar.update(n)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
            self._file.close()
