"""The README's CPU quickstart commands, as pasted: your own JSONL on a small checkpoint (restricted head, no
held-out file), then DPO on the shipped pairs from the model that run exports. Only the starting model (the
tiny chat checkpoint instead of `make demo`'s), the output folders and the step count are overridden."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from qwen3_fixtures import save_chat_checkpoint

REPO = Path(__file__).resolve().parents[2]


def readme_command(script: str) -> list[str]:
    """The README's command line that runs `script` with a CPU quickstart config (`\\` continuations joined)."""
    text = (REPO / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith(f"python recipes/{script} --config ")
                and "-cpu.yaml" in line)
    return shlex.split(line, comments=True)


def run(command: list[str], *overrides: str) -> subprocess.CompletedProcess:
    assert command[0] == "python"
    done = subprocess.run([sys.executable, *command[1:], *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_own_data_then_dpo_on_cpu_run_as_pasted(tmp_path):
    start = save_chat_checkpoint(tmp_path / "start", seed=3)
    rows = (REPO / "recipes/data/vi_arith_train.jsonl").read_text(encoding="utf-8").splitlines(True)
    mine = tmp_path / "my.jsonl"
    mine.write_text("".join(rows[100:130]), encoding="utf-8")  # 30 of "my" rows, no held-out file

    sft = readme_command("fft.py")
    assert "data.train=[my.jsonl]" in sft
    sft = [f"data.train=[{mine}]" if arg == "data.train=[my.jsonl]" else arg for arg in sft]
    done = run(sft, f"model.path={start}", f"output.dir={tmp_path / 'sft'}")
    assert re.search(r"tokenising: 100%\|[^|]*\| 30/30 ", done.stderr)
    steps = losses(tmp_path / "sft")  # one epoch of packed micro-batches, one micro-batch per step
    assert len(steps) >= 1 and steps[-1]["epoch"] == pytest.approx(1.0)
    kept = json.loads((tmp_path / "sft/final/kept_ids.json").read_text())["kept_ids"]
    assert 100 < len(kept) < 5000  # the head covers the tokens the data uses, not all 151,936

    dpo = readme_command("dpo.py")
    done = run(dpo, f"model.path={tmp_path / 'sft/final'}", f"output.dir={tmp_path / 'dpo'}", "train.max_steps=2")
    assert re.search(r"reference log-probs: 100%\|[^|]*\| (\d+)/\1 ", done.stderr), done.stderr[-2000:]
    steps = losses(tmp_path / "dpo")
    assert len(steps) == 2 and steps[0]["dpo_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference
    assert (tmp_path / "dpo/final/model.safetensors").is_file()
