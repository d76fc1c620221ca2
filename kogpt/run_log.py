"""The run folder's record of training: log.jsonl (one JSON object per line) and loss.png.

Lines are appended as they happen, so a killed run loses nothing; resuming drops the lines of
steps after the checkpoint, which the resumed run logs again. Only rank 0 writes.

    log = RunLog(Path("runs/x"), enabled=True, resume_step=None); log.write(step=1, loss=9.1); log.plot()
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import atomic_write

LOG_FILE, PLOT_FILE = "log.jsonl", "loss.png"


class RunLog:
    """log.jsonl (appended line by line, so a kill loses nothing) and loss.png; rank 0 only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = out / LOG_FILE, enabled
        if enabled and resume_step is not None and self.path.exists():  # drop what ran after the checkpoint
            keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
            atomic_write(self.path, lambda p: p.write_text("".join(k + "\n" for k in keep), encoding="utf-8"))
        elif enabled:
            self.path.unlink(missing_ok=True)

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def plot(self) -> None:
        if not self.enabled or not self.path.exists():
            return
        try:
            import matplotlib
        except ImportError:  # optional: pip install 'kogpt[train]'
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = [json.loads(ln) for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("_", " "))
        ax.set(xlabel="step", ylabel="loss (nats/token)", title=self.path.parent.name)
        ax.grid(alpha=0.3)
        ax.legend()
        atomic_write(self.path.parent / PLOT_FILE, lambda p: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)
