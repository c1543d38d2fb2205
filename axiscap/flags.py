"""Command-line flags generated from config dataclasses, as ``serve``'s are generated from ``Settings``.

A field declared with ``option(default, help=...)`` becomes ``--field-name`` with that default, and the
help shows the default; its type comes from the annotation (``bool``: a switch; ``tuple[X, ...]``:
several values; ``X | None``: an optional X). ``from_flags`` builds the dataclass back from the parsed
flags, so each default is written once, in its dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, **argparse_options):
    """A dataclass field with a command-line flag; ``flag`` replaces ``--field-name``; ``argparse_options``
    (``choices``, ``metavar``, a ``type`` that parses the text) go to ``add_argument`` as they are."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "argparse": argparse_options})


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per ``option`` field of ``cls`` (a field without a default is a required flag)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if "help" not in field.metadata or field.name in skip:
            continue
        given = field.metadata["argparse"]
        options: dict[str, Any] = {"dest": field.name, "help": field.metadata["help"]}
        if field.default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = field.default
            if field.default not in (None, False) and "(default" not in options["help"]:
                shown = " ".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
                options["help"] += f" (default {shown})"
        kind = _flag_type(hints[field.name])
        if kind is bool:
            options["action"] = "store_true"
        elif "type" not in given and typing.get_origin(kind) is tuple:
            options |= {"type": typing.get_args(kind)[0], "nargs": "+"}
        elif "type" not in given:
            options["type"] = kind
        parser.add_argument(field.metadata["flag"] or "--" + field.name.replace("_", "-"), **options | given)


def from_flags(cls: type[T], args: argparse.Namespace, **given) -> T:
    """``cls`` from the parsed flags of its ``option`` fields (several values become a tuple), and ``given``."""
    values = {}
    for field in dataclasses.fields(cls):
        if "help" in field.metadata and field.name not in given and hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values, **given)


def _flag_type(annotation):
    """The type a flag parses: ``X | None`` is X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation
