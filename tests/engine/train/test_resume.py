"""Training checkpoints on disk: a manifest verified on write and on resume, fallback past damaged checkpoints,
pruning only after the new checkpoint verifies, stale temporaries, and the lock on output.dir."""
import json
import shutil

import pytest
import torch

from qforge.engine.errors import CheckpointError
from qforge.engine.train import resume
from qforge.engine.train.parallel import Dist


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def _train_and_save(out, steps, keep_last=5, first=1):
    model, optimizer, scheduler = _toy()
    for step in range(first, steps + 1):
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        resume.save_checkpoint(out, step, model, optimizer, scheduler, {"epoch": 0, "index": step}, {"n": step},
                              Dist(), keep_last)
    return model


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {  # what a kill, a full disk or a bad copy leaves behind, checkpoint by checkpoint
    "truncated shard": lambda d: _truncate(next((d / "state").glob("*.distcp"))),
    "deleted shard": lambda d: next((d / "state").glob("*.distcp")).unlink(),
    "flipped byte in a shard": lambda d: _flip(next((d / "state").glob("*.distcp"))),
    "missing .metadata": lambda d: (d / "state/.metadata").unlink(),
    "truncated .metadata": lambda d: _truncate(d / "state/.metadata"),
    "truncated meta.json": lambda d: _truncate(d / "meta.json"),
    "truncated rng": lambda d: _truncate(d / "rng-rank0.pt"),
    "empty state/": lambda d: [p.unlink() for p in (d / "state").iterdir()],
    "missing manifest and meta.json": lambda d: [(d / "manifest.json").unlink(), (d / "meta.json").unlink()],
    "truncated manifest": lambda d: _truncate(d / "manifest.json"),
}


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    _train_and_save(out, 3)
    return out


def test_manifest_lists_every_file_with_size_and_hash(three_checkpoints):
    path = three_checkpoints / "checkpoints/step-3"
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    on_disk = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest) == on_disk and {"meta.json", "rng-rank0.pt", "state/.metadata"} <= set(manifest)
    assert all(manifest[name]["size"] == (path / name).stat().st_size for name in manifest)
    assert resume.verify_checkpoint(path) is None


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(three_checkpoints, tmp_path, damage, caplog):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    DAMAGES[damage](out / "checkpoints/step-3")
    with caplog.at_level("WARNING", logger="qforge.train"):
        chosen = resume.resume_checkpoint(out, "auto", Dist())
    assert chosen == out / "checkpoints/step-2"
    assert "checkpoint" in caplog.text and "step-3 is damaged" in caplog.text and "falling back" in caplog.text
    assert (out / "checkpoints/step-3.damaged").is_dir() and resume.latest_checkpoint(out).name == "step-2"
    model, optimizer, scheduler = _toy()
    assert resume.load_checkpoint(chosen, model, optimizer, scheduler, Dist())["step"] == 2
    # an explicit train.resume that does not verify is an error naming the damage, not a silent fallback
    DAMAGES[damage](out / "checkpoints/step-2")
    with pytest.raises(CheckpointError, match=r"train.resume=.*step-2: damaged checkpoint \(.+\); use "
                                              r"train.resume=auto"):
        resume.resume_checkpoint(out, str(out / "checkpoints/step-2"), Dist())


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(three_checkpoints):
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of an earlier run \(step-3\); set "
                                              r"train.resume=auto to continue it, or choose another output.dir"):
        resume.resume_checkpoint(three_checkpoints, None, Dist())


def test_no_checkpoint_verifies_is_an_error(three_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    for step in (1, 2, 3):
        _truncate(out / f"checkpoints/step-{step}/meta.json")
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies"):
        resume.resume_checkpoint(out, "auto", Dist())
    assert resume.resume_checkpoint(tmp_path / "empty", "auto", Dist()) is None


def test_older_checkpoints_are_pruned_only_after_the_new_one_verifies(tmp_path, monkeypatch):
    _train_and_save(tmp_path, 2, keep_last=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]
    monkeypatch.setattr(resume, "_check_files", lambda *args, **kwargs: "state/__0_0.distcp has 0 bytes")
    with pytest.raises(CheckpointError, match="step-3 did not verify after writing .*the older checkpoints are kept"):
        _train_and_save(tmp_path, 3, keep_last=1, first=3)
    assert (tmp_path / "checkpoints/step-2/manifest.json").is_file()
    assert (tmp_path / "checkpoints/step-3.damaged").is_dir() and resume.latest_checkpoint(tmp_path).name == "step-2"
    with pytest.raises(CheckpointError, match="step-2 did not verify"):  # a re-save of the same step
        _train_and_save(tmp_path, 2, keep_last=1, first=2)
    monkeypatch.undo()
    assert resume.verify_checkpoint(tmp_path / "checkpoints/step-2") is None  # the earlier copy is back


def test_stale_temporaries_are_removed(tmp_path):
    for stale in ("checkpoints/.step-7.tmp/state", ".final.tmp-12345", ".final.old-12345/a", "checkpoints/.step-6.old",
                  "checkpoints/.step-5.old/meta"):  # step-5 and final were moved aside for a write that never landed
        (tmp_path / stale).mkdir(parents=True)
    (tmp_path / "checkpoints/step-6").mkdir()
    resume.clean_stale_temporaries(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "checkpoints", "checkpoints/step-5", "checkpoints/step-5/meta", "checkpoints/step-6", "final", "final/a"]
    (tmp_path / ".final.old-12345").mkdir()  # final/ is in place: the old copy is just left over
    resume.clean_stale_temporaries(tmp_path)
    assert not (tmp_path / ".final.old-12345").exists() and (tmp_path / "final/a").is_dir()


def test_an_explicit_resume_behind_later_checkpoints_of_the_same_dir_is_refused(three_checkpoints):
    with pytest.raises(CheckpointError, match=r"holds a later checkpoint \(step-3\) that would outlive"):
        resume.resume_checkpoint(three_checkpoints, str(three_checkpoints / "checkpoints/step-1"), Dist())
    assert resume.resume_checkpoint(three_checkpoints, str(three_checkpoints / "checkpoints/step-3"), Dist())


def test_a_second_writer_on_output_dir_is_refused(tmp_path):
    with resume.OutputLock(tmp_path, Dist()):
        with pytest.raises(CheckpointError, match=r"output.dir .* is in use by another run \(pid \d+ on .*\); wait"):
            resume.OutputLock(tmp_path, Dist()).__enter__()
    with resume.OutputLock(tmp_path, Dist()):  # released when the first run ends
        pass
