"""Find, load and save model folders in Hugging Face format, safely.

Resolution: a local folder; else a hub id (optional revision) through `huggingface_hub`.
Loading: `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), or
`pytorch_model.bin` (+ index) read with `torch.load(weights_only=True)`; nothing from the folder is
ever executed or unpickled. Tensors are read (not memory-mapped) and cast one at a time into a model built on the meta device,
so choosing bf16 never materializes an fp32 copy. Saving writes every file atomically.

    model = load_model(resolve("skt/kogpt2-base-v2"), dtype=torch.bfloat16)
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.config import GPTConfig
from ..errors import UserError
from ..fileio import FileFormatError, atomic_write, write_json
from ..fileio import read_json as _read_json
from .convert import (ConversionError, config_from_hf, config_to_hf, dropout_from_hf, dtype_from_hf, state_dict_from_hf,
                      state_dict_to_hf)
from ..core.model import GPT
from ..core.int8 import Int8Linear, quantize_weight

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_HUB_METADATA = ["*.json", "*.txt", "*.model"]
BUNDLED = Path(__file__).resolve().parent.parent / "models"  # models shipped inside the package


def bundled_models() -> list[str]:
    """Names of the models installed with kogpt (folders with weights under kogpt/models)."""
    if not BUNDLED.is_dir():
        return []
    return sorted(p.name for p in BUNDLED.iterdir() if (p / CONFIG_FILE).exists())


class CheckpointError(UserError):
    """A model cannot be found or read; the message names the file and what to do."""


# -- resolving a name -------------------------------------------------------------------------
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


# -- reading ----------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """kogpt.fileio.read_json, failing with a CheckpointError (the same message) for model folders."""
    try:
        return _read_json(path)
    except FileFormatError as e:
        raise CheckpointError(str(e)) from None


def load_config(folder: str | os.PathLike, raw: dict | None = None) -> GPTConfig:
    """GPTConfig of a model folder (from its config.json, or `raw` already read from it)."""
    path = Path(folder) / CONFIG_FILE
    try:
        return config_from_hf(read_json(path) if raw is None else raw)
    except (ConversionError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_dropout(folder: str | os.PathLike) -> float:
    """The training dropout a model folder's config.json sets, as transformers would read it."""
    return dropout_from_hf(read_json(Path(folder) / CONFIG_FILE))


def _weight_files(folder: Path) -> tuple[list[Path], str]:
    """The weight files of a folder, safetensors first, and their kind."""
    for index, kind in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        if (folder / index).exists():
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{folder / index} has no weight_map")
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{f} is missing (listed in {folder / index})")
            return files, kind
    if (folder / SAFETENSORS_FILE).exists():
        return [folder / SAFETENSORS_FILE], "safetensors"
    if (folder / BIN_FILE).exists():
        return [folder / BIN_FILE], "bin"
    raise CheckpointError(f"no weights in {folder}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {BIN_FILE}")


def _checkpoint_dtype(tensors: dict[str, object], get) -> torch.dtype:
    for name in tensors:
        if name.endswith("wte.weight"):
            return get(name).dtype
    return torch.float32


def load_model(folder: str | os.PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> GPT:
    """A GPT in eval mode from an HF-format folder; dtype defaults to the checkpoint's."""
    folder = Path(folder)
    raw = read_json(folder / CONFIG_FILE)
    config = load_config(folder, raw)
    with unfragmented():
        sd = read_weights(folder, raw, lambda get, names, dt: state_dict_from_hf(get, names, config, dt), dtype)
        return build_model(config, sd, device)


@contextmanager
def unfragmented():
    """Keep glibc's heap from fragmenting while loading: tensors are read, converted and freed one after
    another, and once glibc has freed a big mmap'ed block it serves blocks up to that size from the
    heap, where freed ones pin memory (up to ~1.5× the weights at the peak). Blocks of 128 KiB and
    more come from mmap while this is active (for the whole process); afterwards the thresholds stay
    fixed at glibc's own ceilings (mmap 32 MiB, trim 64 MiB) for the rest of the process. A no-op
    without glibc."""
    global _unfragmented_depth
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    with _unfragmented_lock:
        _unfragmented_depth += 1
        mallopt(M_MMAP_THRESHOLD, 128 << 10)
    try:
        yield
    finally:
        with _unfragmented_lock:
            _unfragmented_depth -= 1
            if not _unfragmented_depth:  # glibc's own ceilings; setting them stops its adaptive resizing
                mallopt(M_MMAP_THRESHOLD, 32 << 20)
                mallopt(M_TRIM_THRESHOLD, 64 << 20)


_unfragmented_depth = 0
_unfragmented_lock = threading.Lock()


def read_weights(folder: Path, raw: dict, convert, dtype: torch.dtype | None = None):
    """convert(get, names, dtype) over the weight files of an HF folder, tensors fetched one at a time.

    `raw` is the folder's config.json; dtype defaults to the one it declares, else the embeddings'.
    """
    files, kind = _weight_files(folder)
    with ExitStack() as stack:
        where: dict[str, tuple[Path, object]] = {}
        for f in files:
            if kind == "safetensors":
                handle = SafetensorsFile(f)
                stack.callback(handle.close)
            else:
                handle = _load_bin(f)
            for name in handle.keys():
                where[name] = (f, handle)

        def get(name: str) -> torch.Tensor:
            f, handle = where[name]
            try:
                return handle.get_tensor(name, dtype) if kind == "safetensors" else handle[name]
            except OSError as e:
                raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from None

        if dtype is None:
            dtype = dtype_from_hf(raw) or _checkpoint_dtype(where, get)
        try:
            return convert(get, where.keys(), dtype)
        except ConversionError as e:
            raise CheckpointError(f"{folder}: {e}") from None


@contextmanager
def _no_init():
    """Skip weight initialization while building a model whose weights are about to be replaced: on
    the meta device it costs nothing, but the first meta normal_ imports torch's reference ops (~1.5 s,
    ~150 MB). A torch function mode, so it is local to this thread."""
    with _SkipInit():
        yield


class _SkipInit(torch.overrides.TorchFunctionMode):
    _INIT = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
             torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_, torch.nn.init.zeros_,
             torch.nn.init.ones_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._INIT:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def meta_model(config: GPTConfig) -> GPT:
    """A GPT on the meta device (no memory, no random init), for weights assigned afterwards."""
    with torch.device("meta"), _no_init():
        return GPT(config)


def build_model(config: GPTConfig, state_dict: dict[str, torch.Tensor], device="cpu") -> GPT:
    """A GPT holding exactly these tensors (no random init, no extra copy)."""
    model = meta_model(config)
    assign_weights(model, state_dict)
    model.tie_weights()
    return model.to(device).eval()


def assign_weights(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Make `state_dict`'s tensors the parameters of `module` (built on the meta device), checking names and shapes."""
    expected = {n for n, _ in module.named_parameters()}
    missing = expected - state_dict.keys()
    if missing:
        raise CheckpointError(f"state dict lacks {sorted(missing)[:3]}")
    for name, t in state_dict.items():
        want = module.get_parameter(name).shape
        if t.shape != want:
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, the config needs {tuple(want)}")
    module.load_state_dict(state_dict, strict=False, assign=True)
    return module


def load_int8(folder: str | os.PathLike, device: str | torch.device = "cpu", kernel: str = "auto",
              compute_dtype: torch.dtype = torch.bfloat16) -> GPT:
    """A GPT with int8 linear layers from an HF-format folder, each weight read in compute_dtype (through
    a small buffer) and quantized at once: the float model never exists whole, so the peak memory is
    the int8 model plus one compute_dtype tensor."""
    folder = Path(folder)
    raw = read_json(folder / CONFIG_FILE)
    config = load_config(folder, raw)
    model = meta_model(config)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def finish(name: str, t: torch.Tensor) -> torch.Tensor | None:
        module = name.removesuffix(".weight")
        if module in linears:
            quantized[module] = quantize_weight(t)
            return None
        if name == "wte.weight" and config.tie_word_embeddings:  # the tied head gets its own int8 copy
            quantized["lm_head"] = quantize_weight(t)
        return t

    with unfragmented():
        sd = read_weights(folder, raw, lambda get, names, dt: state_dict_from_hf(get, names, config, dt, finish),
                          compute_dtype)
        for module, (q, scales) in quantized.items():
            parent, _, attr = module.rpartition(".")
            layer = Int8Linear(q, scales, sd.pop(module + ".bias", None), compute_dtype, kernel)
            setattr(model.get_submodule(parent) if parent else model, attr, layer)
        assign_weights(model, sd)
    return model.to(device).eval()


_CHUNK_BYTES = 16 << 20  # read buffer when a load casts tensors to another dtype
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _natural(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsFile:
    """Tensors of a .safetensors file, read with plain file reads rather than a memory map.

    Only the tensors a caller keeps count toward the process's memory: loading never holds the
    file's pages and the model at once. Header, dtypes, shapes and offsets are checked against the
    file size, so a truncated or corrupt file fails with a CheckpointError naming it.
    """

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "rb")
        size = os.fstat(self.f.fileno()).st_size
        try:
            n = int.from_bytes(self.f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(self.f.read(n))
            header.pop("__metadata__", None)
            self.base = 8 + n
            for name, info in header.items():
                begin, end = info["data_offsets"]
                shape = info["shape"]
                if not isinstance(shape, list) or not all(_natural(d) for d in (*shape, begin, end)):
                    raise ValueError(f"tensor {name!r} has a negative or non-integer shape or offset")
                numel = math.prod(shape)
                if info["dtype"] not in _ST_DTYPES or end - begin != numel * _ST_DTYPES[info["dtype"]].itemsize \
                        or not 0 <= begin <= end <= size - self.base:
                    raise ValueError(f"tensor {name!r} has an inconsistent dtype, shape or offsets")
        except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            self.f.close()
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
        self.header = header

    def keys(self):
        return self.header.keys()

    def get_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, cast to `dtype` (floating point only) through a small buffer when given: a
        bf16 load of an fp32 file never holds a whole fp32 tensor (the embeddings: 157 MB for KoGPT2)."""
        info = self.header[name]
        src = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        self.f.seek(self.base + begin)
        if dtype is None or dtype == src or not src.is_floating_point or not dtype.is_floating_point:
            t = torch.empty(info["shape"], dtype=src)
            self._read(t.reshape(-1), name)
            return t
        out = torch.empty(info["shape"], dtype=dtype)
        flat, step = out.reshape(-1), _CHUNK_BYTES // src.itemsize
        buf = torch.empty(min(step, flat.numel()), dtype=src)
        for i in range(0, flat.numel(), step):
            part = buf[:min(step, flat.numel() - i)]
            self._read(part, name)
            flat[i:i + part.numel()] = part
        return out

    def _read(self, t: torch.Tensor, name: str) -> None:
        n = t.numel() * t.element_size()
        if n and self.f.readinto(t.view(torch.uint8).numpy()) != n:
            raise CheckpointError(f"{self.path} is truncated (tensor {name!r})")

    def close(self) -> None:
        self.f.close()


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: tensors and plain containers only, never arbitrary pickled code
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (pre-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return sd


# -- writing (atomic_write and write_json live in kogpt.fileio, torch-free; re-exported here) ----
def save_model(model: GPT, folder: str | os.PathLike) -> None:
    """Write config.json and model.safetensors in HF format (transformers loads the folder)."""
    folder = Path(folder)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if any(k.endswith("qweight") for k in sd):
        raise CheckpointError("an int8-quantized model cannot be saved in HF format; save the float model")
    write_weights(folder, state_dict_to_hf(sd, model.config), config_to_hf(model.config, model.wte.weight.dtype))


def write_weights(folder: Path, hf_tensors: dict[str, torch.Tensor], config: dict) -> None:
    """model.safetensors and config.json of an HF folder, each written atomically."""
    atomic_write(folder / SAFETENSORS_FILE, lambda p: save_file(hf_tensors, str(p), metadata={"format": "pt"}))
    write_json(folder / CONFIG_FILE, config)
