"""`kogpt train`: pretrain (or continue pretraining) a GPT on data from `kogpt prepare`.

Every TrainConfig field is a flag (built from the field's own help) and a TOML key of --config;
flags win over the file. Under `torchrun --nproc_per_node N -m kogpt train ...` it runs DDP.
An --out that holds an earlier run is refused unless --resume or --overwrite says what to do with it.
"""

from __future__ import annotations

import argparse

NAME = "train"
HELP = "train a Korean GPT on prepared data (TOML config, every key overridable by a flag; torchrun for DDP)"
EPILOG = """examples:
  kogpt train --data data --out runs/tiny --preset tiny --max-steps 300
  kogpt train --config pretrain.toml --lr 3e-4 --resume
  kogpt train --data data --out runs/tiny --preset tiny --overwrite   # delete runs/tiny's earlier run, start over
  torchrun --nproc_per_node 2 -m kogpt train --config pretrain.toml --grad-accum 4
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.config import FIELDS, SECTIONS

    p.epilog, p.formatter_class = EPILOG, argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (keys as the flags, with _ for -)")
    group = p
    for name, f in FIELDS.items():
        if name in SECTIONS:
            group = p.add_argument_group(SECTIONS[name])
        flag, help = "--" + name.replace("_", "-"), f"{f.metadata['help']} (default: {f.default!r})"
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        elif f.type == "dict":
            group.add_argument("--weight", dest=name, action="append", default=argparse.SUPPRESS,
                               metavar=f.metadata["metavar"], help=f.metadata["help"] + " (repeatable)")
        else:
            metavar = {"int": "N", "float": "X"}.get(f.type, name.split("_")[-1].upper())
            group.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type],
                               default=argparse.SUPPRESS, metavar=metavar, help=help)


def run(args: argparse.Namespace) -> int:
    from ..training.loop import train
    from ..training.config import FIELDS, load_config
    from .prepare import parse_weights

    overrides = {k: v for k, v in vars(args).items() if k in FIELDS}
    if "weights" in overrides:
        overrides["weights"] = parse_weights(overrides["weights"])
    result = train(load_config(args.config, overrides))
    return 128 + result.signal if result.signal else 0
