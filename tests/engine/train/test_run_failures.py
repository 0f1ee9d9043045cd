"""A run never ends "successfully" with broken weights, falls back past a damaged checkpoint, stops cleanly when
signalled or orphaned, and answers bad data with advice that fits (tiny model, a few steps each)."""
import json
import os
import signal

import pytest
import torch
from tiny_run import tiny_overrides, tiny_run_files  # noqa: F401 (fixture)

from qforge.engine.checkpoint import save as hf_checkpoint
from qforge.engine import load_model
from qforge.engine.config_io import load_config
from qforge.engine.errors import CheckpointError, ConfigError, DataError, StorageError, TrainingError
from qforge.engine.model import Qwen3
from qforge.engine.train import FFTConfig, train
from qforge.engine.train import loop
from qforge.engine.train import resume as train_state
from qforge.engine.train.parallel import init_distributed
from qforge.engine.vocab import read_id_file


def _config(files, out, **extra) -> FFTConfig:
    return load_config(FFTConfig, None, tiny_overrides(files, out, **extra))


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_nonfinite_weights_are_never_saved_or_exported(tiny_run_files, tmp_path):
    config = _config(tiny_run_files, tmp_path, **{"train.max_steps": 2})
    config.optim.lr = float("inf")  # one finite step with an infinite learning rate: every weight NaN/inf
    with pytest.raises(TrainingError, match=r"step 2: \d+ weight tensors hold NaN/inf .*nothing saved, last good "
                                            r"checkpoint: none; lower optim.lr"):
        train(config)
    assert not (tmp_path / "final").exists() and not list((tmp_path / "checkpoints").glob("step-*"))


def test_a_run_whose_last_steps_were_skipped_says_so_and_fails(tiny_run_files, tmp_path, monkeypatch):
    real_loss, calls = Qwen3.loss, {"n": 0}

    def nan_at_the_end(self, batch, **kwargs):
        calls["n"] += 1
        loss = real_loss(self, batch, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(Qwen3, "loss", nan_at_the_end)
    umask = os.umask(0o022)
    try:
        with pytest.raises(TrainingError, match=r"the last 1 of 3 steps were skipped .*holds the weights of step 2"):
            train(_config(tiny_run_files, tmp_path, **{"train.max_steps": 3}))
    finally:
        os.umask(umask)
    assert [r["skipped_steps"] for r in _records(tmp_path)] == [0, 0, 1]
    exported = load_model(tmp_path / "final", dtype=torch.float32)  # finite weights of step 2, readable by others
    assert all(torch.isfinite(p).all() for p in exported.parameters())
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "final").iterdir()} == {"0o644"}


def test_resume_falls_back_past_a_damaged_checkpoint_bitwise_and_keeps_each_step_once(tiny_run_files, tmp_path,
                                                                                       caplog):
    steps = {"train.max_steps": 3, "train.save_every": 1, "train.keep_last": 3}
    first = train(_config(tiny_run_files, tmp_path, **steps))
    shard = next((tmp_path / "checkpoints/step-3/state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # a kill or a full disk while copying the last checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # a write cut short by a kill
    with caplog.at_level("WARNING", logger="qforge.train"):
        resumed = train(_config(tiny_run_files, tmp_path, **steps, **{"train.resume": "auto"}))
    assert "step-3 is damaged" in caplog.text and (tmp_path / "checkpoints/step-3.damaged").is_dir()
    assert resumed.losses == first.losses[2:]  # resumed from step 2, bitwise the same step 3
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3]  # no duplicates, no half line

    # The data changed under resume=auto: the old cursor means nothing for it, and the run says so. Its kept
    # vocabulary (vocab.restrict=data) changed with it: refused, unless the override accepts it (logged).
    other = tmp_path / "other.jsonl"
    other.write_text("".join(open(tiny_run_files["train"]).readlines()[:40]))
    changed = {**steps, "train.max_steps": 4, "train.resume": "auto", "data.train": f"[{other}]"}
    with pytest.raises(CheckpointError, match=r"step-3 was trained with vocab.kept=.*train.resume_override=\[vocab.kept\]"):
        train(_config(tiny_run_files, tmp_path, **changed))
    with caplog.at_level("WARNING", logger="qforge.train"):
        train(_config(tiny_run_files, tmp_path, **changed, **{"train.resume_override": "[vocab.kept]"}))
    assert "data changed since" in caplog.text and "restarts at the first batch" in caplog.text
    assert "changed settings accepted by train.resume_override: vocab.kept" in caplog.text


def test_sigterm_during_the_final_export_leaves_no_temporary(tiny_run_files, tmp_path, monkeypatch):
    for stale in (".final.tmp-999999", "checkpoints/.step-9.tmp"):  # what an earlier kill -9 left
        (tmp_path / stale).mkdir(parents=True)
    real_save_file = hf_checkpoint.save_file

    def signalled_while_writing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(hf_checkpoint, "save_file", signalled_while_writing)
    result = train(_config(tiny_run_files, tmp_path, **{"train.max_steps": 1}))
    assert result.interrupted and result.final_dir is None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".final") or p.name == "final") == []
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]


def test_ranks_stop_with_a_checkpoint_when_their_launcher_is_gone(tiny_run_files, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    real_ppid, calls = os.getppid(), {"n": 0}

    def parent():  # torchrun's agent is our parent until it is killed; then init (or a subreaper) adopts us
        calls["n"] += 1
        return real_ppid if calls["n"] <= 2 else 1

    monkeypatch.setattr(loop.os, "getppid", parent)
    result = train(_config(tiny_run_files, tmp_path, **{"train.max_steps": 50}))
    assert result.interrupted and result.steps_done == 2
    assert train_state.latest_checkpoint(tmp_path).name == "step-2"


def test_data_that_cannot_fill_a_step_gets_advice_that_fits(tiny_run_files, tmp_path):
    with pytest.raises(DataError, match=r"all \d+ training examples were dropped, longer than data.max_tokens=16 .*"
                                        r"raise data.max_tokens to at least \d+ or set data.overlong=truncate"):
        train(_config(tiny_run_files, tmp_path / "a", **{"data.max_tokens": 16, "data.overlong": "drop"}))
    with pytest.raises(DataError, match=r"all \d+ training examples were dropped, left without a supervised token"):
        train(_config(tiny_run_files, tmp_path / "b", **{"data.max_tokens": 16}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: all 2 rows were skipped \(data.on_error=skip\), first: "
                                        r".*bad.jsonl:1"):
        train(_config(tiny_run_files, tmp_path / "c", **{"data.train": f"[{bad}]", "data.on_error": "skip"}))


def test_a_device_this_machine_lacks_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="train.device='cuda' but (this torch is built without CUDA|no GPU is "
                                          "visible); use train.device=auto or cpu"):
        init_distributed("cuda")


@pytest.mark.parametrize("text, message", [
    ("[1, 2", "invalid JSON"),
    ('{"keep": [1, 2]}', r'expected a JSON object with "kept_ids" or "suppress_ids"'),
    ('{"kept_ids": ["a", "b"]}', r'"kept_ids" must be a list of non-negative integer token ids'),
    ('{"kept_ids": [1, true]}', r'"kept_ids" must be a list of non-negative integer token ids'),
    ("[1, 2]", r'a bare JSON list does not say what it holds'),
])
def test_a_bad_kept_id_file_is_a_one_line_config_error(tmp_path, text, message):
    path = tmp_path / "kept.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        read_id_file(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert read_id_file(_write(tmp_path / "ok.json", '{"kept_ids": [3, 1]}'))["kept_ids"] == [3, 1]


def _write(path, text):
    path.write_text(text)
    return path


def test_no_steps_to_run_does_not_crash_downstream(tmp_path):
    """train.max_steps ≤ 0 is refused at config load; a run that logged no step still ends without a crash."""
    assert loop.plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png") is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo')
    assert loop.plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png") is None
