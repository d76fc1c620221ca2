"""Where a model folder comes from: a local folder, a model bundled with kogpt, or a Hugging Face hub
snapshot (optionally at a revision) through `huggingface_hub`, metadata and safetensors only (pickled
weights only when a repo has no safetensors). Offline, the error says how to copy a model in.

    folder = resolve("skt/kogpt2-base-v2"); model = load(folder)  # kogpt.hf.load
"""

from __future__ import annotations

import os
from pathlib import Path

from .folder import ADAPTER_CONFIG, CONFIG_FILE, CheckpointError

_HUB_METADATA = ["*.json", "*.txt", "*.model"]
BUNDLED = Path(__file__).resolve().parent.parent / "models"  # models shipped inside the package


def bundled_models() -> list[str]:
    """Names of the models and adapters installed with kogpt (folders under kogpt/models)."""
    if not BUNDLED.is_dir():
        return []
    return sorted(p.name for p in BUNDLED.iterdir() if (p / CONFIG_FILE).exists() or (p / ADAPTER_CONFIG).exists())


def local_folder(name_or_path: str | os.PathLike) -> Path | None:
    """The folder itself, or a bundled model's folder; None when `name_or_path` is neither."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if str(name_or_path) in bundled_models():
        return BUNDLED / str(name_or_path)
    return None


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder for `name_or_path`: the folder itself, a bundled model, or a hub snapshot."""
    if (local := local_folder(name_or_path)) is not None:
        return local
    path = Path(name_or_path).expanduser()
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the model folder that holds config.json")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or not all(name.split("/")):
        raise CheckpointError(f"model folder not found: {name}")
    return _download(name, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=_HUB_METADATA + ["*.safetensors"]))
        if not any(folder.glob("*.safetensors")):  # older repos ship only pickled weights
            folder = Path(snapshot_download(repo_id, revision=revision,
                                            allow_patterns=_HUB_METADATA + ["pytorch_model*.bin"]))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"{where} is not a model on the Hugging Face hub ({type(e).__name__})") from None
    except HFValidationError:
        raise CheckpointError(f"model folder not found, and {repo_id!r} is not a valid hub id") from None
    except Exception as e:  # offline: connection errors, LocalEntryNotFoundError, ...
        rev = f" --revision {revision}" if revision else ""
        raise CheckpointError(
            f"cannot download {where} from the Hugging Face hub ({type(e).__name__}); on a machine with "
            f"internet run `hf download {repo_id}{rev} --local-dir DIR`, copy DIR here and pass it as the model"
        ) from None
    return folder
