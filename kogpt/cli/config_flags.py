"""Command-line flags from settings dataclasses: one --flag per field, with the field's own help.

`kogpt train` (TrainConfig) and `kogpt finetune` (FinetuneConfig and the TrainConfig it holds) build
their flags here, so a setting is documented once, in its field, and spelled alike in both commands:
weight_decay is --weight-decay, a bool is --x / --no-x. A flag not given stays out of the parsed
namespace (argparse.SUPPRESS), so the dataclass default, or a TOML file's value, stands.

    add_config_flags(parser, {"optimizer": "lr beta1 beta2"}, FIELDS); given(args, FIELDS)
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import Field

from ..training.config import flag_name

_TYPES = {"int": int, "float": float, "str": str}
_METAVARS = {"int": "N", "float": "X"}


def add_config_flags(p: argparse.ArgumentParser, groups: Mapping[str, str], fields: Mapping[str, Field],
                     defaults: Mapping[str, object] | None = None, helps: Mapping[str, str] | None = None) -> None:
    """A --help group per title of `groups`, with the flags of its fields (space-separated names of
    `fields`); `defaults` and `helps` replace a field's default and help where a command differs."""
    defaults, helps = defaults or {}, helps or {}
    for title, names in groups.items():
        group = p.add_argument_group(title)
        for name in names.split():
            f = fields[name]
            default, help = defaults.get(name, f.default), helps.get(name, f.metadata["help"])
            if f.type == "dict":  # NAME=X entries, one per repeated flag
                group.add_argument(f.metadata["flag"], dest=name, action="append", default=argparse.SUPPRESS,
                                   metavar=f.metadata["metavar"], help=f"{help} (repeatable)")
                continue
            help += "" if default in ("", None) else f" (default: {default!r})"
            if f.type == "bool":
                group.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=help)
            else:
                metavar = f.metadata.get("metavar") or _METAVARS.get(f.type, name.split("_")[-1].upper())
                group.add_argument(flag_name(name), type=_TYPES[f.type], default=argparse.SUPPRESS, metavar=metavar,
                                   help=help)


def given(args: argparse.Namespace, fields: Mapping[str, Field]) -> dict:
    """The settings of `fields` given as flags, by field name."""
    return {k: v for k, v in vars(args).items() if k in fields}


def add_composed_flags(p: argparse.ArgumentParser, groups: Mapping[str, str], own: Mapping[str, Field], config,
                       loop_help: Mapping[str, str], epilog: str) -> None:
    """The flags of a ScheduledConfig (FinetuneConfig, SFTConfig), which holds the training loop's TrainConfig
    as `config.loop`: its own fields and the loop's, a name in both being its own; the
    defaults are `config`'s (a command's recipe), --model's the bundled model; and --debug."""
    from .common import default_model

    p.epilog, p.formatter_class = epilog, argparse.RawDescriptionHelpFormatter
    defaults = {**vars(config.loop), **vars(config), "model": default_model() or ""}
    add_config_flags(p, groups, _composed(own), defaults, loop_help)
    p.add_argument("-d", "--debug", action="store_true", help="show full tracebacks")


def composed_settings(args: argparse.Namespace, own: Mapping[str, Field]) -> dict:
    """The flat settings of a composed command (see add_composed_flags), --model defaulting to the bundled model."""
    from .common import default_model

    return {"model": default_model() or "", **given(args, _composed(own))}


def _composed(own: Mapping[str, Field]) -> dict:
    from ..training.config import FIELDS as LOOP

    return {**LOOP, **own}
