"""Files written whole or not at all, JSON read with one-line errors, and output paths checked up front.

Torch-free on purpose: the data pipeline (and each of its tokenizer processes) and the run log use
it without loading the model stack.

    write_json(Path("out/meta.json"), meta); meta = read_json(Path("out/meta.json"))
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UserError


class FileFormatError(UserError):
    """A file kogpt reads is missing or malformed; the message names the file."""


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) and move the result over `path` only once it is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, d: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))


def read_json(path: Path) -> dict:
    """The JSON object in `path`; FileFormatError when it is missing, not JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileFormatError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise FileFormatError(f"{path} must hold a JSON object")
    return d


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """UserError unless `path` is a folder or can be made one (checked before any long work)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a folder")
    _check_parents(p, flag, path)


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """UserError unless `path` can be written as a file: not a folder, and no file where a parent folder belongs."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file name")
    _check_parents(p, flag, path)


def _check_parents(p: Path, flag: str, path) -> None:
    for parent in p.parents:  # the nearest one that exists must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
            return
