"""The one table of dtype names: the short names users type (fp32, bf16, fp16, and the int8 layouts),
the long names that HF config.json files and training TOMLs use (float32, bfloat16, float16), and
the torch dtypes behind both. "int4" is groupwise int4 with 32 inputs a group; "int4-g64" names another group size.

Torch is imported only when a torch dtype is asked for, so `kogpt --help` lists the names at once.

    torch_dtype("bf16") is torch_dtype("bfloat16") is torch.bfloat16; long_name(torch.float32) == "float32"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    import torch

LONG = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short -> long (= torch attribute) name
INT8 = ("int8", "int8-dynamic")  # int8 linear layers over a bf16 model (weight-only; int8 inputs too)
INT4 = ("int4", "int4-g64", "int4-g128")  # groupwise int4 linear layers over a bf16 model (weight-only)
INT4_GROUP = 32  # inputs per int4 group for plain "int4"
QUANTIZED = (*INT8, *INT4)  # the layouts with integer weights (no float twin in transformers; no --compile)
NAMES = ("auto", *LONG, *INT8, *INT4)  # what --dtype accepts when a model is loaded for inference
TRAIN = ("bfloat16", "float32")  # the autocast dtypes training runs in (TrainConfig.dtype)


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a short or long float name; UserError for any other name."""
    import torch

    long = LONG.get(name, name)
    if long not in LONG.values():
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join((*LONG, *LONG.values()))}")
    return getattr(torch, long)


def int4_group(name: str) -> int | None:
    """The group size of an int4 name ("int4": 32, "int4-g64": 64), None for any other name; UserError for an
    int4 name with a malformed group (the kernels' group sizes are checked by core/int4.check_group)."""
    if name == "int4":
        return INT4_GROUP
    if not name.startswith("int4"):
        return None
    group = name.removeprefix("int4-g")
    if group == name or not group.isdigit():
        raise UserError(f"unknown dtype {name!r}; int4 with another group size is written int4-g64 or int4-g128")
    return int(group)


def long_name(dtype: "torch.dtype") -> str:
    """'float32', 'bfloat16' or 'float16': the name config.json and training TOMLs use."""
    name = str(dtype).removeprefix("torch.")
    if name not in LONG.values():
        raise UserError(f"dtype {name} is not one kogpt reads or writes ({', '.join(LONG.values())})")
    return name
