"""What a run reports: MFU is right or not shown; metrics.jsonl holds each step once and survives a cut-short write."""
import json

import torch

from qforge.engine.train import metrics


def test_mfu_remeasures_a_peak_taken_on_a_busy_machine_and_never_shows_above_100_percent(monkeypatch):
    peaks = iter([1e9, 4e9])  # the start-up measurement ran while another job held the cores
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda device, dtype: next(peaks))
    mfu = metrics.MFU(torch.device("cpu"), torch.float32)
    assert mfu(3e9, 1.0) == 0.75 and mfu.peak == 4e9  # 3e9 FLOP/s achieved: the first peak was too low
    assert mfu(1e9, 1.0) == 0.25

    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda device, dtype: 1e9)
    stuck = metrics.MFU(torch.device("cpu"), torch.float32, world=2)
    assert stuck(1.5e9, 1.0) == 0.75  # two ranks: twice the peak
    assert stuck(9e9, 1.0) is None and stuck.remeasure == 0  # still > 100% after remeasuring: not shown


def test_progress_bar_leaves_out_an_unknown_mfu(tmp_path):
    logger = metrics.MetricsLogger(tmp_path, 2, 0, enabled=True, progress=True, tensorboard=False)
    record = {"step": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0, "mfu": None}
    logger.log(record)
    assert "mfu" not in logger.bar.postfix and "loss=1.0000" in logger.bar.postfix
    logger.log({**record, "step": 2, "mfu": 0.123})
    assert "mfu=12.3%" in logger.bar.postfix
    logger.close()


def test_resume_drops_records_after_the_checkpoint_and_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)] + [json.dumps({"step": 2, "eval_loss": 2.0})]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')
    logger = metrics.MetricsLogger(tmp_path, 10, 2, enabled=True, progress=False, tensorboard=False)
    logger.log({"step": 3, "eval_loss": 1.5})
    logger.close()
    assert [(r["step"], sorted(r)) for r in map(json.loads, path.read_text().splitlines())] == [
        (1, ["loss", "step"]), (2, ["loss", "step"]), (2, ["eval_loss", "step"]), (3, ["eval_loss", "step"])]
    assert metrics.read_metrics(tmp_path / "absent.jsonl") == []
