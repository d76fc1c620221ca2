"""The run folder's record of training: log.jsonl (one JSON object per line) and loss.png.

Lines are appended as they happen, each with one write() to a file opened for appending, so a
killed run loses nothing and leaves at worst a torn last line, which readers skip. Resuming drops
the lines of steps after the checkpoint (and any torn line), which the resumed run logs again.
Only rank 0 writes.

    log = RunLog(Path("runs/x"), enabled=True, resume_step=None); log.write(step=1, loss=9.1); log.plot()
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..fileio import atomic_write

LOG_FILE, PLOT_FILE = "log.jsonl", "loss.png"


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl; lines that are not a JSON object with a step (a torn write) are skipped."""
    records = []
    for line in path.read_bytes().splitlines():
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
    return records


def _line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


class RunLog:
    """log.jsonl (appended line by line, so a kill loses nothing) and loss.png; rank 0 only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = out / LOG_FILE, enabled
        if enabled and resume_step is not None and self.path.exists():  # drop what ran after the checkpoint
            keep = [r for r in read_log(self.path) if r["step"] <= resume_step]
            atomic_write(self.path, lambda p: p.write_text("".join(map(_line, keep)), encoding="utf-8"))
        elif enabled:
            self.path.unlink(missing_ok=True)

    def write(self, **record) -> None:
        if self.enabled:
            data = _line(record).encode("utf-8")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                while data:  # one write() for a line of any usual length; the loop only guards short writes
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)

    def plot(self) -> None:
        if not self.enabled or not self.path.exists():
            return
        try:
            import matplotlib
        except ImportError:  # optional: pip install 'kogpt[train]'
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = read_log(self.path)
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("_", " "))
        ax.set(xlabel="step", ylabel="loss (nats/token)", title=self.path.parent.name)
        ax.grid(alpha=0.3)
        ax.legend()
        atomic_write(self.path.parent / PLOT_FILE, lambda p: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)
