"""The one command line of every config-driven recipe: `--config FILE [key=value ...] [--debug]`.

An error the user can act on (`QforgeError`: bad config, data, checkpoint, a run that diverged, a failed
endpoint) is printed as one line and ends the recipe with its exit code (see engine/errors.py and the README);
anything else is an internal error: exit 1 with the traceback. `--debug` prints the traceback in both cases.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from qforge.engine.config_io import anchor_shipped_paths, load_config, settings
from qforge.engine.errors import QforgeError
from qforge.engine.preflight import check_environment, preflight
from qforge.recipes.main import shipped_configs

T = TypeVar("T")
R = TypeVar("R")


@settings
class OutputDirSettings:
    """The `output:` section of the recipes that do not train (eval, judge, synth, curate, prune): only where
    they write, `output.dir`, which each requires. The training recipes use the engine's `OutputSettings`
    (engine/train/config.py: dir plus logging and export keys that mean nothing here, so they are not accepted)."""
    dir: str | None = None


def resolve_config(name: str) -> str:
    """`--config` as given when it is a file, else the shipped config of that name (`--config demo`)."""
    if Path(name).exists():
        return name
    shipped = shipped_configs().get(name.removesuffix(".yaml"))
    return str(shipped) if shipped and "/" not in name else anchor_shipped_paths(name)


def print_report_md(config, result) -> None:
    """Prints the `output.dir/report.md` a recipe wrote."""
    print(open(f"{config.output.dir}/report.md", encoding="utf-8").read())


def run_recipe(config_class: type[T], run: Callable[[T], R], argv: Sequence[str] | None, description: str,
               example: str, *, report: Callable[[T, R], int | None] | None = None,
               load: Callable[[type[T], str, Sequence[str]], T] | None = None) -> int:
    """Parses the arguments, builds the config (`load`, default `load_config`), calls `run(config)`, then
    `report(config, result)`; returns the process exit code (report's, or 0)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="YAML config file, or the name of a shipped one (`qforge configs` lists them)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of every error")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        check_environment()  # before the config: a shadowed package or an old torch is named first
        config = (load or load_config)(config_class, resolve_config(args.config), args.overrides)
        preflight()  # after it: a config error stays one line on stderr
        result = run(config)
        code = report(config, result) if report is not None else None
        return 0 if code is None else code
    except QforgeError as error:
        if args.debug:
            traceback.print_exc()
        print("error: " + " ".join(line.strip() for line in str(error).splitlines()), file=sys.stderr)
        return error.exit_code
    except Exception:  # noqa: BLE001 - the last resort: a bug, shown with its traceback
        traceback.print_exc()
        print("internal error: the traceback above is a qforge bug (please report it)", file=sys.stderr)
        return 1
