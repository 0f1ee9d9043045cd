"""Optional Weights & Biases logging next to metrics.jsonl / TensorBoard (offline: no account, no network)."""
import json

import pytest

from qforge.engine.train.metrics import MetricsLogger


@pytest.mark.slow
def test_wandb_run_gets_config_and_metrics_and_resumes_with_the_same_id(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    options = {"project": "qforge-test", "name": "run", "config": {"optim": {"lr": 3e-3}}}
    logger = MetricsLogger(tmp_path, 4, 0, enabled=True, progress=False, tensorboard=False, wandb=options)
    logger.log({"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0})
    logger.log({"step": 2, "eval_mcq_accuracy": 0.625})
    logger.log_tables(2, {"eval_mcq_categories": [{"category": "stem", "accuracy": 0.75, "total": 8},
                                                  {"category": "humanities", "accuracy": 0.5, "total": 8}]})
    logger.close()
    wandb.teardown()  # the wandb service writes the offline run file out when it stops (at process exit otherwise)
    run_id = (tmp_path / "wandb_id").read_text()
    [run] = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    data = (run / f"run-{run_id}.wandb").read_bytes()  # the run's protobuf records hold keys and JSON values
    for needle in (b"eval_mcq_accuracy", b"0.625", b"loss", b"2.5", b"optim", b"0.003", b"eval_mcq_categories"):
        assert needle in data, needle
    [table] = run.glob("files/media/table/eval_mcq_categories_*.table.json")
    assert json.loads(table.read_text())["data"] == [["stem", 0.75, 8], ["humanities", 0.5, 8]]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # A restart of the same output dir continues the same W&B run.
    again = MetricsLogger(tmp_path, 4, 2, enabled=True, progress=False, tensorboard=False, wandb=options)
    again.close()
    assert (tmp_path / "wandb_id").read_text() == run_id


def test_without_wandb_option_nothing_is_started(tmp_path):
    logger = MetricsLogger(tmp_path, 1, 0, enabled=True, progress=False, tensorboard=False)
    logger.log({"step": 1, "eval_mcq_accuracy": 0.5})
    logger.close()
    assert logger.wandb is None and not (tmp_path / "wandb").exists()
