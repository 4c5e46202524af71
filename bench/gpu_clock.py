"""The GPU's SM clock and power while a benchmark runs, from `nvidia-smi` sampled every
50 ms: the H200 runs the 1B step at its 700 W software power cap, with the SM clock at
1410-1980 MHz (docs/performance.md, eighth session), so runs on different machines or
after different warm-ups differ by a few percent. Recording the clock with each timing
tells a code change from a slower clock.

    with GpuClock() as clock:
        ...timed steps...
    clock.summary()   # {"sm_mhz_median": ..., "power_w_median": ..., "power_capped": ...}
"""

from __future__ import annotations

import shutil
import statistics
import subprocess

QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"
SW_POWER_CAP = 0x4  # nvidia-smi's clocks_throttle_reasons bit for the software power cap


class GpuClock:
    """Samples nvidia-smi in the background between __enter__ and __exit__. Does nothing
    (summary() is {}) where `enabled` is False or nvidia-smi is not on PATH."""

    def __init__(self, enabled: bool = True, device: int = 0, period_ms: int = 50):
        self.cmd = ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                    "-lms", str(period_ms), "-i", str(device)]
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.proc, self.lines = None, []

    def __enter__(self):
        if self.enabled:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                out, _ = self.proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
            self.lines = out.splitlines()
        return False

    def summary(self) -> dict:
        """Median and p10 SM clock, median power, and the share of samples held at the
        software power cap, over the samples taken (busy or not)."""
        rows = []
        for line in self.lines:
            try:
                mhz, watts, reasons = (f.strip() for f in line.split(","))
                rows.append((float(mhz), float(watts), int(reasons, 16)))
            except ValueError:  # a header, "[N/A]", or a line cut by terminate()
                continue
        if not rows:
            return {}
        mhz = sorted(r[0] for r in rows)
        return {"sm_mhz_median": round(statistics.median(mhz)),
                "sm_mhz_p10": round(mhz[len(mhz) // 10]),
                "power_w_median": round(statistics.median(r[1] for r in rows)),
                "power_capped": round(sum(bool(r[2] & SW_POWER_CAP) for r in rows) / len(rows),
                                      2),
                "samples": len(rows)}
