"""Command-line helpers shared by the entry points: flags generated from the config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from mmcam_fast.errors import MMCamError

_BOOL_STRINGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _parse_bool(text: str) -> bool:
    try:
        return _BOOL_STRINGS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}") from None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str]) -> None:
    """One ``--kebab-case`` flag per dataclass field; every default is None so presets can apply.

    Booleans take ``--flag`` / ``--no-flag``; lists take several values; ``X | None`` takes X.
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in args if a is not type(None))
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        text = f"{helps.get(field.name, '')} (default: {default})".strip()
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, type=typing.get_args(kind)[0], nargs="*", default=None, help=text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=text)


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run an entry point: a project error becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except MMCamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
