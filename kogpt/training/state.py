"""Training checkpoints that never lose work: one file per step, written atomically, last K kept.

A checkpoint (`checkpoints/step-00000100.pt`) holds the full (unsharded) state of the trained
parameters and their optimizer, keyed by parameter name (a LoRA run's frozen base is left out: it is
loaded again from its folder, so a 6B run's checkpoint is megabytes, not 12 GB), the step (the data
position and the learning rate are functions of it), RNG states, the model config and the training
config. It is written to a temp file and renamed,
so a kill at any moment leaves the previous checkpoints intact and at worst a stray temp file;
it is read back with `weights_only=True`. The same file resumes a single process or a torchrun job.

    save_checkpoint(run / "checkpoints", step, state, keep_last=3); state = load_latest(run / "checkpoints")
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..errors import UserError
from ..fileio import atomic_write  # looked up at each save: tests wrap it to pause between temp write and rename

_NAME = re.compile(r"step-(\d+)\.pt")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full state dicts of the trained parameters and the optimizer on CPU, keyed by parameter name
    (a collective under FSDP)."""
    sd, osd = get_state_dict(model, optimizer, options=_FULL)
    # every name of a frozen parameter: ignore_frozen_params keeps a tied one's alias (lm_head.weight)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in sd.items() if k not in frozen}, osd


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's model, optimizer and RNG states (every rank calls it); frozen parameters
    are not in it (the objective loaded them), so only the trained ones must be."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing = {name for name, p in model.named_parameters() if p.requires_grad} - set(state["model"])
    if missing:
        raise UserError(f"the checkpoint has no {sorted(missing)[0]} (and {len(missing) - 1} more trained "
                        f"parameters): it is from another kind of run; train into a new --out")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=not frozen))
    set_rng_state(state["rng"])


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write `state` as folder/step-N.pt atomically, then delete all but the newest keep_last."""
    path = folder / f"step-{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in checkpoints(folder)[:-max(1, keep_last)]:
        old.unlink(missing_ok=True)
    return path


def load_latest(folder: Path) -> dict | None:
    """The newest checkpoint in `folder` (stray temp files of an interrupted save are removed)."""
    for tmp in folder.glob(".step-*.tmp"):
        tmp.unlink(missing_ok=True)
    found = checkpoints(folder)
    if not found:
        return None
    try:
        return torch.load(found[-1], map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{found[-1]} is not a readable checkpoint ({type(e).__name__}: {e}); "
                        f"delete it to resume from the one before") from None
