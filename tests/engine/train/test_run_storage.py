"""Directories and disks that fail a run, and resumes that would change what is trained: each ends in one line
naming the path or key with its documented exit code, and never costs a checkpoint or an earlier final/."""
import contextlib
import hashlib
import json
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from tiny_run import TINY_MODEL, tiny_overrides, tiny_run_files  # noqa: F401 (fixture)

from qforge.engine import files
from qforge.engine.config_io import load_config
from qforge.engine.errors import CheckpointError, ConfigError, StorageError
from qforge.engine.train import FFTConfig, train
from qforge.engine.train import build as train_build
from qforge.engine.train import resume as train_state


def _config(files_, out, **extra) -> FFTConfig:
    return load_config(FFTConfig, None, tiny_overrides(files_, out, **extra))


def _digests(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# --- inputs and directories, checked before output.dir is created ------------------------------------------------

@pytest.mark.parametrize("key", ["data.train", "data.eval"])
def test_a_missing_data_file_exits_2_and_leaves_no_output_dir(tiny_run_files, tmp_path, key):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"{key}: .*missing.jsonl: no such file or directory; fix the path") as error:
        train(_config(tiny_run_files, out, **{key: f"[{tmp_path / 'missing.jsonl'}]"}))
    assert error.value.exit_code == 2 and "\n" not in str(error.value)
    assert not out.exists()


def test_output_and_cache_directories_that_cannot_be_used(tiny_run_files, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [({"output.dir": str(a_file)}, r"output.dir=.*a_file is a file, not a directory"),
             ({"output.dir": str(a_file / "run")}, r"output.dir=.*a_file/run lies under .*a_file, which is a file"),
             ({"data.cache_dir": str(a_file / "cache")}, r"data.cache_dir=.*a_file/cache lies under .*a_file")]
    for extra, message in cases:
        out = tmp_path / "run"
        with pytest.raises(ConfigError, match=message) as error:
            train(_config(tiny_run_files, extra.pop("output.dir", out), **extra))
        assert error.value.exit_code == 2 and not out.exists()


@contextlib.contextmanager
def _read_only(path: Path):
    """`path` made read-only by a read-only bind mount of itself (root only; skips where mount is refused)."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if bind.returncode:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.decode().strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True)
        if remount.returncode:
            pytest.skip(f"cannot remount read-only: {remount.stderr.decode().strip()}")
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_directories_are_named_before_anything_runs(tiny_run_files, tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    with _read_only(parent):
        with pytest.raises(ConfigError, match=r"output.dir=.*parent/run: cannot write in .*parent \(Read-only file "
                                              r"system\); make it writable or choose another output.dir") as error:
            train(_config(tiny_run_files, parent / "run"))
        assert error.value.exit_code == 2
    # an existing run whose checkpoints folder is no longer writable: refused at the start, not at the first save
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with _read_only(run / "checkpoints"):
        with pytest.raises(ConfigError, match=r"output.dir=.*run/checkpoints: cannot write in .*Read-only"):
            train(_config(tiny_run_files, run, **{"train.resume": "auto"}))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


# --- free space and full disks ------------------------------------------------------------------------------------

def test_free_space_is_checked_before_a_checkpoint_and_before_the_export(tiny_run_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    steps = {"train.max_steps": 1}
    train(_config(tiny_run_files, out, **steps))
    checkpoint_bytes = sum(p.stat().st_size for p in (out / "checkpoints/step-1").rglob("*") if p.is_file())
    final_bytes = sum(p.stat().st_size for p in (out / "final").rglob("*") if p.is_file())
    before = _digests(out)
    real_usage = shutil.disk_usage

    def usage_with(free_for):
        def usage(path):
            total, used, free = real_usage(path)
            return type(real_usage(path))(total, used, free_for(Path(path)))
        return usage

    # the checkpoint of step 2 does not fit: the error names the bytes it needs, step-1 and final/ stay as they were
    monkeypatch.setattr(files.shutil, "disk_usage", usage_with(lambda p: 1000 if p.name == "checkpoints" else 1 << 40))
    with pytest.raises(StorageError, match=r"not enough free space for checkpoint step-2: needs ([\d,]+) bytes in "
                                           r".*run/checkpoints, 1,000 free; free some space") as error:
        train(_config(tiny_run_files, out, **{"train.max_steps": 2, "train.resume": "auto"}))
    needed = int(_one_line(error).split("needs ")[1].split(" bytes")[0].replace(",", ""))
    assert checkpoint_bytes <= needed <= 1.1 * checkpoint_bytes + (1 << 20)  # the estimate is the real size
    assert error.value.exit_code == 7
    kept = ("checkpoints/", "final/")
    assert {k: v for k, v in _digests(out).items() if k.startswith(kept)} == {
        k: v for k, v in before.items() if k.startswith(kept)}
    assert not list((out / "checkpoints").glob(".step-*"))

    # the export does not fit: checked before a byte is written; the checkpoint of step 2 is there to rerun from
    monkeypatch.setattr(files.shutil, "disk_usage", usage_with(lambda p: 1000 if p.name == "run" else 1 << 40))
    with pytest.raises(StorageError, match=r"not enough free space for the export .*run/final: needs ([\d,]+) bytes"
                       ) as error:
        train(_config(tiny_run_files, out, **{"train.max_steps": 2, "train.resume": "auto"}))
    needed = int(_one_line(error).split("needs ")[1].split(" bytes")[0].replace(",", ""))
    assert final_bytes <= needed <= 1.1 * final_bytes + (1 << 20)
    assert _digests(out / "final") == {k[len("final/"):]: v for k, v in before.items() if k.startswith("final/")}
    assert train_state.latest_checkpoint(out).name == "step-2"


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """RLIMIT_FSIZE for this process (SIGXFSZ ignored, so a write past it fails with EFBIG like a full disk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_disk_that_fills_up_during_a_save_or_the_export_loses_nothing(tiny_run_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_config(tiny_run_files, out, **{"train.max_steps": 1}))
    before = _digests(out / "final")
    real_write = train_state._write_checkpoint

    def full_disk_at_step_2(tmp, step, *args, **kwargs):
        with _file_size_limit(1 << 20) if step == 2 else contextlib.nullcontext():
            return real_write(tmp, step, *args, **kwargs)

    monkeypatch.setattr(train_state, "_write_checkpoint", full_disk_at_step_2)
    with pytest.raises(StorageError, match=r"writing checkpoint step-2 to .*run/checkpoints failed \(.*\); free some "
                                           r"space .*resume with train.resume=auto") as error:
        train(_config(tiny_run_files, out, **{"train.max_steps": 2, "train.resume": "auto"}))
    assert error.value.exit_code == 7 and "\n" not in str(error.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # no .step-2.tmp
    assert train_state.verify_checkpoint(out / "checkpoints/step-1") is None

    monkeypatch.setattr(train_state, "_write_checkpoint", real_write)
    real_save_model = train_build.save_model  # the export's writer (the weights policy's)

    def full_disk_export(*args, **kwargs):
        with _file_size_limit(1 << 20):
            return real_save_model(*args, **kwargs)

    monkeypatch.setattr(train_build, "save_model", full_disk_export)
    with pytest.raises(StorageError, match=r"writing the export to .*run/final failed \(.*File too large.*\); free "
                                           r"some space, then rerun with train.resume=auto"):
        train(_config(tiny_run_files, out, **{"train.max_steps": 2, "train.resume": "auto"}))
    assert _digests(out / "final") == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".final")]
    assert train_state.verify_checkpoint(out / "checkpoints/step-2") is None


def test_the_manifest_is_hashed_while_writing_and_matches_the_files(tiny_run_files, tmp_path, monkeypatch):
    def no_rereading(path):
        raise AssertionError(f"{path} re-read to hash it")

    monkeypatch.setattr(train_state, "_sha256", no_rereading)
    train(_config(tiny_run_files, tmp_path, **{"train.max_steps": 1}))
    monkeypatch.undo()
    step = tmp_path / "checkpoints/step-1"
    manifest = json.loads((step / "manifest.json").read_text())["files"]
    on_disk = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
               for name, data in ((str(p.relative_to(step)), p.read_bytes()) for p in step.rglob("*")
                                  if p.is_file() and p.name != "manifest.json")}
    assert manifest == on_disk and "state/.metadata" in manifest
    assert train_state.verify_checkpoint(step) is None


# --- resume with changed settings ---------------------------------------------------------------------------------

def test_a_resume_that_would_change_what_is_trained_is_refused_naming_the_key(tiny_run_files, tmp_path, caplog):
    lora = {"train.method": "lora", "train.lora.rank": 4, "train.lora.alpha": 8}
    out = tmp_path / "lora"
    train(_config(tiny_run_files, out, **lora, **{"train.max_steps": 1}))
    bigger = tmp_path / "bigger.json"
    bigger.write_text(json.dumps({**TINY_MODEL, "hidden_size": 64}))
    resume = {"train.max_steps": 2, "train.resume": "auto"}
    for changed, key in [({"train.lora.alpha": 64}, "train.lora.alpha"), ({"train.lora.rank": 8}, "train.lora.rank"),
                         ({"train.lora.target_modules": "[q_proj]"}, "train.lora.target_modules"),
                         ({"train.precision": "bf16-mixed"}, "train.precision"),
                         ({"vocab.restrict": "all"}, "vocab.restrict"),
                         ({"train.method": "full"}, "train.method"), ({"model.config": str(bigger)}, "model")]:
        with pytest.raises(CheckpointError, match=rf"step-1 was trained with {key}=.*, this run sets .*; resuming would"
                                                  rf" silently change what is trained: restore {key}, .*"
                                                  rf"train.resume_override=\[{key}\]") as error:
            train(_config(tiny_run_files, out, **{**lora, **resume, **changed}))
        assert error.value.exit_code == 4 and "\n" not in str(error.value)
    with caplog.at_level("WARNING", logger="qforge.train"):
        result = train(_config(tiny_run_files, out, **{**lora, **resume, "train.lora.alpha": 16,
                                                       "train.resume_override": "[train.lora.alpha]"}))
    assert result.steps_done == 2 and "train.lora.alpha: 8.0 → 16.0" in caplog.text


def test_a_rerun_that_would_train_zero_steps_on_new_data_is_refused(tiny_run_files, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_run_files, out, **{"train.max_steps": 2}))
    before = _digests(out / "final")
    new = tmp_path / "new.jsonl"
    new.write_text("".join(open(tiny_run_files["train"]).readlines()[8:]))
    rerun = {"train.max_steps": 2, "train.resume": "auto", "data.train": f"[{new}]",
             "train.resume_override": "[vocab.kept]"}
    with pytest.raises(ConfigError, match=r"the data changed since .*step-2, but that checkpoint is already at step 2 "
                                          r"of 2: this run would train 0 steps on the new data; raise train.max_steps "
                                          r"above 2 to continue on it, or start fresh in another output.dir") as error:
        train(_config(tiny_run_files, out, **rerun))
    assert error.value.exit_code == 2 and _digests(out / "final") == before
    assert train(_config(tiny_run_files, out, **{**rerun, "train.max_steps": 3})).steps_done == 3
    assert _digests(out / "final") != before
