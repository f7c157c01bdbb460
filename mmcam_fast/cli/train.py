"""``python -m mmcam_fast.train`` / ``torchrun -m mmcam_fast.train``: train MinMaxCAM (or plain CAM).

Under ``torchrun --nproc-per-node G`` each process trains on its own N sets of S images (a global
batch of G x N x S), rank 0 logs, validates and writes checkpoints; ``--resume auto`` continues from
the newest complete checkpoint (also after torchrun's ``--max-restarts``).

Flags mirror :class:`mmcam_fast.config.TrainConfig`; values not given come from the preset of the
(data set, backbone) pair, then from the defaults. ``--config FILE`` reads a YAML of the same keys
(flags given on the command line win). ``--help`` lists each flag's default and the presets that
change it; ``--data X --backbone Y --help`` shows the values that pair resolves to.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import yaml

from mmcam_fast import training
from mmcam_fast.cli import ArgumentParser, add_dataclass_flags, console_entry
from mmcam_fast.config import _BACKBONE_PRESETS, _DATA_PRESETS, TrainConfig, build_config, preset
from mmcam_fast.errors import ConfigError

# Each field's --help text and what a default of None means, from the config's own fields
_FIELDS = dataclasses.fields(TrainConfig)
_HELP = {f.name: f.metadata["help"] for f in _FIELDS}
_NONE_MEANS = {f.name: f.metadata["none_means"] for f in _FIELDS if f.metadata.get("none_means")}


def _value_text(value: Any, none_text: str = "none") -> str:
    if value is None:
        return none_text
    if isinstance(value, list):
        return f"[{', '.join(str(v) for v in value)}]" if value else "none"
    return str(value)


def _by_value(cells: dict[str, Any]) -> dict[str, list[str]]:
    """``{name: value}`` -> ``{value text: [names]}``, names sorted."""
    groups: dict[str, list[str]] = {}
    for name in sorted(cells):
        groups.setdefault(_value_text(cells[name]), []).append(name)
    return groups


def preset_default_text(name: str, base: Any, data: str | None = None, backbone: str | None = None) -> str:
    """How the default of config field ``name`` reads in ``--help``, derived from the preset tables.

    ``base`` is the dataclass default. Given ``data`` and/or ``backbone`` (preset names; others are
    ignored), the value resolved for them; otherwise the default and the presets that change it,
    e.g. ``"224; 64 for synthetic, tiny-imagenet"``.
    """
    datas = [data] if data in _DATA_PRESETS else sorted(_DATA_PRESETS)
    short = backbone.removesuffix("_cam") if backbone else None
    backbones = [short] if short in _BACKBONE_PRESETS else sorted(_BACKBONE_PRESETS)
    table = {(d, b): preset(d, b).get(name, base) for d in datas for b in backbones}
    first = next(iter(table.values()))
    if all(v == first for v in table.values()):
        text = _value_text(first, _NONE_MEANS.get(name, "none"))
        given = []
        if len(datas) == 1:
            given.append(f"--data {data}")
        if len(backbones) == 1:
            given.append(f"--backbone {backbone}")
        if given and any(name in preset(d, b) for d, b in table):  # the value comes from a preset
            text += f" with {' '.join(given)}"
        return text
    # Rules, later ones winning (as in preset()): the backbones' values, then the data sets' values,
    # then the cells where a data set's value applies to some backbones only ("True for synthetic,
    # tiny-imagenet with resnet18, resnet50"); each stated only where it changes the answer.
    by_backbone = {b: _BACKBONE_PRESETS[b][name] for b in backbones
                   if name in _BACKBONE_PRESETS[b] and _BACKBONE_PRESETS[b][name] != base}

    def before_data(b: str) -> Any:
        return by_backbone.get(b, base)

    by_data: dict[str, Any] = {}
    both: dict[tuple[str, str], list[str]] = {}
    for d in datas:
        column = {b: table[d, b] for b in backbones}
        if all(v == before_data(b) for b, v in column.items()):
            continue
        value = _DATA_PRESETS[d].get(name, base)
        if all(v == value for v in column.values()):
            by_data[d] = value
            continue
        cells = {b: v for b, v in column.items() if v != before_data(b)}
        for text, names in _by_value(cells).items():
            both.setdefault((text, ", ".join(names)), []).append(d)
    parts = [f"{value} for {', '.join(names)}" for value, names in _by_value(by_backbone).items()]
    parts += [f"{value} for {', '.join(names)}" for value, names in _by_value(by_data).items()]
    parts += [f"{value} for {', '.join(ds)} with {bs}" for (value, bs), ds in both.items()]
    note = "; a data set's value wins over a backbone's" if by_data and by_backbone else ""
    return "; ".join([_value_text(base, _NONE_MEANS.get(name, "none")), *parts]) + note


def help_defaults(data: str | None = None, backbone: str | None = None) -> dict[str, str]:
    """Every TrainConfig field's default as ``--help`` shows it (see :func:`preset_default_text`)."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        base = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = preset_default_text(f.name, base, data, backbone)
    return out


def _read_config_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"--config {path}: a folder, expected a YAML file (a run folder's config.yaml)")
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a mapping of config keys")
    return loaded


def _help_pair(argv: list[str] | None) -> tuple[str | None, str | None]:
    """The (data, backbone) the help describes: from the command line, else the --config file."""
    pre = ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--config", "--data", "--backbone"):
        pre.add_argument(flag, default=None)
    try:
        known, _ = pre.parse_known_args(argv)
    except ConfigError:  # a malformed command line: the full parse reports it
        return None, None
    data, backbone = known.data, known.backbone
    if known.config is not None and (data is None or backbone is None):
        try:
            loaded = _read_config_file(Path(known.config))
        except ConfigError:  # reported by the full parse
            loaded = {}
        data = data if data is not None else loaded.get("data")
        backbone = backbone if backbone is not None else loaded.get("backbone")
    return (data if isinstance(data, str) else None), (backbone if isinstance(backbone, str) else None)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help lines wrapped at spaces only, so names such as tiny-imagenet or --lr-gamma stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The train parser; its help shows the defaults resolved for the --data/--backbone in ``argv``."""
    parser = ArgumentParser(prog="mmcam_fast.train", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of config keys")
    add_dataclass_flags(parser, TrainConfig, help_defaults(*_help_pair(argv)))
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The run's config: defaults < preset of (data, backbone) < ``--config`` file < flags."""
    args = vars(build_parser(argv).parse_args(argv))
    config_file = args.pop("config")
    values = {}
    if config_file is not None:
        values.update(_read_config_file(config_file))
    values.update({k: v for k, v in args.items() if v is not None})
    return build_config(values, source=str(config_file) if config_file else "command line")


def main(argv: list[str] | None = None):
    """Parse, train, and print the summary line (rank 0 alone under torchrun); returns the RunResult."""
    config = parse_args(argv)
    result = training.train(config)
    if result.is_main:  # under torchrun, rank 0 alone reports
        print(result.summary_line(), flush=True)
    return result


cli = console_entry(main, "mmcam-train")
