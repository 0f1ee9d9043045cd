"""Package layout only (metadata lives in pyproject.toml).

The top-level folders are mapped under the `qforge` import root so that an install never adds a bare
`engine` or `kernels` module (HF's `kernels` package exists and transformers imports it). The package list
is computed (every folder with an __init__.py), which pyproject.toml cannot express with a mapped root.
"""
from pathlib import Path

from setuptools import setup

FOLDERS = ("engine", "kernels", "recipes", "tools")
ROOT = Path(__file__).parent

setup(
    packages=[f"qforge.{'.'.join(init.parent.relative_to(ROOT).parts)}" for folder in FOLDERS
              for init in sorted((ROOT / folder).rglob("__init__.py"))],
    package_dir={f"qforge.{folder}": folder for folder in FOLDERS},
)
