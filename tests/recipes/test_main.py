"""The `qforge` command: every recipe and tool as a subcommand, shipped configs by name, from any directory."""
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qforge.recipes import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
QFORGE = shutil.which("qforge", path=str(Path(sys.executable).parent))


def test_every_subcommand_names_a_module_with_a_main_and_every_recipe_has_one():
    for name, (module, _) in cli_main.COMMANDS.items():
        assert callable(importlib.import_module(module).main), name
    recipe_entry_points = {path.stem for path in (ROOT / "recipes").glob("*.py")
                           if "\nif __name__ == \"__main__\":" in path.read_text()}
    covered = {module.rsplit(".", 1)[1] for module, _ in cli_main.COMMANDS.values()}
    assert recipe_entry_points - {"main"} <= covered, recipe_entry_points - covered


def test_help_lists_every_command(capsys):
    assert cli_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*cli_main.COMMANDS, "configs", "preflight"]:
        assert f"  {name} " in out


def test_unknown_command_suggests_the_close_one(capsys):
    assert cli_main.main(["ftt"]) == 2
    assert "did you mean 'fft'" in capsys.readouterr().err


def test_configs_lists_shows_and_copies(tmp_path, capsys, monkeypatch):
    assert cli_main.main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert all(f"{path.stem} " in listing for path in (ROOT / "recipes/configs").glob("*.yaml"))
    assert cli_main.main(["configs", "show", "demo"]) == 0
    assert capsys.readouterr().out == (ROOT / "recipes/configs/demo.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    assert cli_main.main(["configs", "copy", "demo"]) == 0
    assert (tmp_path / "demo.yaml").read_text() == (ROOT / "recipes/configs/demo.yaml").read_text()
    assert cli_main.main(["configs", "copy", "demo"]) == 2  # never overwrites
    assert cli_main.main(["configs", "show", "nope"]) == 2


@pytest.mark.skipif(QFORGE is None, reason="the qforge console script is not installed (pip install -e .)")
def test_console_script_runs_a_shipped_config_from_another_directory(tmp_path):
    """`qforge fft --config demo` outside the checkout: the config is found by name, its `recipes/...` data
    paths resolve to the installed package, and the run trains (two steps) into the working directory."""
    done = subprocess.run([QFORGE, "fft", "--config", "demo", "train.max_steps=2", "train.eval_every=0",
                           "train.save_every=0", "evaluate.data=null", "data.eval=[]"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "outputs/demo/final/model.safetensors").exists()
    assert "qforge.preflight: backends on cpu/float32" in done.stderr


@pytest.mark.skipif(QFORGE is None, reason="the qforge console script is not installed (pip install -e .)")
def test_subcommand_help_names_the_subcommand():
    done = subprocess.run([QFORGE, "dpo", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: qforge dpo")
