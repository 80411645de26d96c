"""Config dataclasses on the command line: one ``--flag`` per field, its help text in the field.

Searchers' ``Config`` and the experiment scripts' ``Args`` (cleanrl's shape: one file, one args
dataclass) are plain dataclasses whose fields come from ``option``. ``add_config_arguments`` gives
a parser one flag per field; ``parse_config`` builds the dataclass from a command line.
"""

from __future__ import annotations

import argparse
from dataclasses import field, fields


def option(default, help: str, **kw):
    """A config field with its CLI help text (``choices``, ``type`` for a None default, ``nargs``)."""
    return field(default=default, metadata={"help": help, **kw})


def add_config_arguments(parser, config_cls) -> None:
    """One ``--option`` per field of ``config_cls`` (help from the field's metadata)."""
    for f in fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if "default" not in help_ and f.default not in ("", None):  # (a help that names its default keeps it)
            help_ += " (default: %(default)s)"
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, default=f.default, help=help_,
                                action="store_false" if f.default else "store_true")
        else:
            extra = {"nargs": f.metadata["nargs"]} if "nargs" in f.metadata else {}
            parser.add_argument(flag, dest=f.name, default=f.default, help=help_, choices=f.metadata.get("choices"),
                                type=f.metadata.get("type", type(f.default)), **extra)


def config_from_args(config_cls, args):
    """The config from parsed arguments, validated where it has ``validate`` (before any model loads)."""
    config = config_cls(**{f.name: getattr(args, f.name) for f in fields(config_cls)})
    if hasattr(config, "validate"):
        config.validate()
    return config


def parse_config(config_cls, argv=None, description: str = ""):
    """``config_cls`` from a command line (``sys.argv`` by default): an experiment script's ``Args``."""
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser, config_cls)
    return config_from_args(config_cls, parser.parse_args(argv))
