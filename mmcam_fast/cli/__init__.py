"""Command-line helpers shared by the entry points: flags generated from the config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from mmcam_fast.errors import ConfigError, MMCamError

_BOOL_STRINGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _parse_bool(text: str) -> bool:
    try:
        return _BOOL_STRINGS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer no smaller than ``low`` (the flag is named by argparse)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def seed_value(text: str) -> int:
    """An argparse ``type``: a random seed, an integer in [0, 2**32) (numpy's range)."""
    value = int_at_least(0)(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def device_value(text: str) -> str:
    """An argparse ``type`` for a one-process command's ``--device``: ``cpu``, ``cuda`` or ``cuda:N``,
    checked against this machine (no CUDA, no such GPU) before any work, as ``train`` checks it."""
    from mmcam_fast.distributed import _device_for

    return str(_device_for(text, 0, 1))


def folder_value(text: str) -> Path:
    """An argparse ``type`` for an output folder: refused when a file is there (the folder itself is
    made when it is first written to)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a file, expected a folder")
    return path


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type,
                        defaults: Mapping[str, str] | None = None) -> None:
    """One ``--kebab-case`` flag per dataclass field; every default is None so presets can apply.

    Derived from the fields: the argument group (``metadata["section"]``), the help text
    (``metadata["help"]``) and, for ``Literal`` fields, the choices shown (the config's validation
    checks them, the same rule for flags and ``--config`` files). Booleans take ``--flag`` /
    ``--no-flag``; lists take several values; ``X | None`` takes X.

    Args:
        defaults: field name -> how its default reads in the help (e.g. the values it takes under
            presets); fields not in it show the dataclass default.
    """
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(cls):
        section = field.metadata.get("section")
        if section is not None and section not in groups:
            groups[section] = parser.add_argument_group(section)
        target = groups[section] if section is not None else parser
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in args if a is not type(None))
        if defaults is not None and field.name in defaults:
            default_text = defaults[field.name]
        else:
            default_text = str(field.default if field.default is not dataclasses.MISSING
                               else field.default_factory())
        # argparse %-formats help strings: a literal % must be doubled
        text = f"{field.metadata.get('help', '')} (default: {default_text})".strip().replace("%", "%%")
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(kind) is list:
            target.add_argument(flag, type=typing.get_args(kind)[0], nargs="*", default=None, help=text)
        elif typing.get_origin(kind) is typing.Literal:
            # the choices shown, checked by the config's validation (one rule for flags and --config)
            target.add_argument(flag, type=str, default=None, help=text,
                                metavar="{" + ",".join(typing.get_args(kind)) + "}")
        else:
            target.add_argument(flag, type=kind, default=None, help=text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are project errors: one line on stderr and exit status 2 (through
    :func:`run_main`), like every other input error, instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None, *,
             prog: str | None = None) -> int:
    """Run an entry point: a project error (bad input) becomes one line on stderr and exit status 2.

    Anything else is a bug and keeps its traceback. ``main`` may return an exit status (an int) or None.
    """
    name = prog or getattr(main, "__module__", "mmcam_fast")
    try:
        status = main(argv)
    except MMCamError as exc:
        text = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"{name}: error: {text}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr, flush=True)
        return 130
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def console_entry(main: Callable[[list[str] | None], Any], prog: str) -> Callable[[], None]:
    """The function a console script calls: ``main`` under :func:`run_main`, then exit with its status."""

    def entry() -> None:
        sys.exit(run_main(main, None, prog=prog))

    entry.__name__ = f"{prog.replace('-', '_')}_entry"
    return entry
