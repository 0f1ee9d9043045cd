"""Prints pip constraints that pin every dependency of pyproject.toml (runtime + the [test] extra) to its
declared floor, so CI can run the suite on the oldest versions the package claims to support."""
import re
import sys
import tomllib
from pathlib import Path

meta = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
for requirement in meta["dependencies"] + meta["optional-dependencies"]["test"]:
    found = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9.]+)(;.*)?$", requirement.split("#")[0].strip())
    if not found:
        sys.exit(f"cannot read a floor from {requirement!r}")
    name, floor, marker = found.groups()
    pin = f"=={floor}" if floor.count(".") >= 2 else f"=={floor}.*"
    print(f"{name}{pin}{marker or ''}")
