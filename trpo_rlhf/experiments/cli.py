"""Command lines of the recipes. `--config FILE.yaml` (TRL's convention) sets any flag's value,
keyed by the flag's name without the dashes; a flag given on the command line overrides the file.

    >>> parser = argparse.ArgumentParser()
    >>> _ = parser.add_argument("--steps", type=int, default=30)
    >>> add_config_flag(parser)
    >>> parser.parse_args(apply_config_file(parser, ["--steps", "5"])).steps
    5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..prompts import read_text_file

CONFIG_HELP = "A YAML file of flag values (flag names without the dashes); flags given on the command line win."


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """Add `--config FILE.yaml` to an argparse parser (an HfArgumentParser gets it from a dataclass
    field named `config` instead)."""
    parser.add_argument("--config", default=None, help=CONFIG_HELP)


def add_config_fields(
    parser: argparse.ArgumentParser,
    config_class: type,
    names: Iterable[str],
    choices: dict[str, Iterable[str]] | None = None,
) -> None:
    """Add `--NAME` to `parser` for each field NAME of the dataclass `config_class`, typed and
    documented as `HfArgumentParser` reads the field (lists, optionals, booleans), with `choices`
    where given, and defaulting to None: an unset flag leaves the field's default to the config.

        >>> from trpo_rlhf import TRPOConfig
        >>> parser = argparse.ArgumentParser()
        >>> add_config_fields(parser, TRPOConfig, ["cg_iters", "lora_target_modules"])
        >>> args = parser.parse_args(["--lora_target_modules", "q_proj", "v_proj"])
        >>> args.cg_iters, args.lora_target_modules
        (None, ['q_proj', 'v_proj'])
    """
    names = list(names)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = [name for name in names if name not in fields]
    if unknown:
        raise ValueError(f"{unknown} are not fields of {config_class.__name__}.")
    by_dest = {action.dest: action for action in HfArgumentParser(config_class)._actions}
    for name in names:
        flag = copy.copy(by_dest[name])
        flag.option_strings = [f"--{name}"]
        flag.default, flag.required = None, False
        if choices and name in choices:
            flag.choices = list(choices[name])
        flag.help = (
            f"{fields[name].metadata.get('help', '')} Default: {config_class.__name__}'s ({fields[name].default!r})."
        )
        parser._add_action(flag)


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> list[str]:
    """Read `--config FILE.yaml` from `argv` (default: sys.argv[1:]), make its values the parser's
    defaults, and return the command line for the parser to parse. A key that is not a flag of
    `parser` is an error naming it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return argv
    path = Path(known.config)
    if not path.is_file():
        parser.error(f"--config {path}: no such file.")
    try:
        values = yaml.safe_load(read_text_file(path, "--config file")) or {}
    except ValueError as error:  # not UTF-8 (yaml's own errors name the file and line already)
        parser.error(str(error))
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}.")
    flags = {action.dest for action in parser._actions} - {"help", "config"}
    unknown = sorted(set(values) - flags)
    if unknown:
        parser.error(f"--config {path}: {unknown} are not flags of this recipe (see --help).")
    for action in parser._actions:
        if action.dest in values:
            action.required = False  # given by the file
    # argparse converts string defaults with the flag's type, as it would the command line's text.
    parser.set_defaults(
        **{key: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for key, v in values.items()}
    )
    return argv
