"""The command line every config-driven recipe shares: `--config FILE [key=value ...]`."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from qforge.engine.client import ChatClientError
from qforge.engine.config_io import ConfigKeyError, load_config

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class OutputSettings:
    """The `output:` section every recipe has: where it writes (`output.dir`)."""
    dir: str | None = None


def config_from_argv(config_class: type[T], argv: Sequence[str] | None, description: str, example: str) -> T:
    """Parses the arguments into `config_class`; a bad file, key or value exits with the error message."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file (see recipes/configs/)")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    args = parser.parse_args(argv)
    try:
        return load_config(config_class, args.config, args.overrides)
    except ConfigKeyError as error:
        sys.exit(f"error: {error}")


def run_from_argv(config_class: type[T], run: Callable[[T], R], argv: Sequence[str] | None, description: str,
                  example: str) -> tuple[T, R]:
    """`config_from_argv`, then `run(config)`; bad input or a failed endpoint exits with the error message."""
    config = config_from_argv(config_class, argv, description, example)
    try:
        return config, run(config)
    except (ValueError, FileNotFoundError, ChatClientError) as error:
        sys.exit(f"error: {error}")
