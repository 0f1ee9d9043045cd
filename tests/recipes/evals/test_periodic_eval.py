"""Evaluation during training: `train.eval_every` also scores the current weights on multiple-choice questions
(in process, or on a snapshot) and with the judge; the scores land in metrics.jsonl and the loss plot, and
equal what recipes/eval.py measures on the saved checkpoint of that step."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "engine" / "train"))

from tiny_run import tiny_overrides, tiny_run_files  # noqa: E402,F401 (pytest fixture)

from qforge.engine.config_io import load_config  # noqa: E402
from scripted_server import ChatServer, ScriptedBackend  # noqa: E402
from qforge.engine.train import train  # noqa: E402
from qforge.recipes.fft import FFTRecipeConfig  # noqa: E402
from qforge.recipes.eval import EvalConfig, run as run_eval  # noqa: E402
from qforge.recipes.evals.periodic_eval import periodic_hook  # noqa: E402

MCQ = "recipes/data/mcq_demo.jsonl"


def train_with(tiny_run_files, out, *extra):
    overrides = tiny_overrides(tiny_run_files, out, **{"train.eval_every": 3}) + [
        f"periodic_eval.mcq={MCQ}", "periodic_eval.limit=8", *extra]
    config = load_config(FFTRecipeConfig, "recipes/configs/demo.yaml", overrides + ["evaluate.data=null"])
    result = train(config, evaluate=periodic_hook(config.periodic_eval))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [r["step"] for r in records if "eval_loss" in r]
    assert eval_steps and len(eval_steps) == len(set(eval_steps)), eval_steps  # each step evaluated once
    return result, {r["step"]: r for r in records if any(k.startswith("eval_") and k != "eval_loss" for k in r)}


def reference_accuracy(checkpoint, out):
    """recipes/eval.py on a saved checkpoint, the ordinary way."""
    config = load_config(EvalConfig, "recipes/configs/eval.yaml", [
        f"model.path={checkpoint}", f"data.path={MCQ}", "data.limit=8", "eval.mode=loglik", f"output.dir={out}"])
    return run_eval(config)["overall"]["accuracy"]


@pytest.mark.slow
def test_mcq_on_snapshots_and_in_process_match_the_saved_checkpoints(tiny_run_files, tmp_path):
    from qforge.engine import load_model
    from qforge.engine.data import ChatTemplate
    from qforge.engine.train import EvalPoint

    out = tmp_path / "run"
    result, scores = train_with(tiny_run_files, out, "periodic_eval.where=snapshot")
    assert sorted(scores) == [3, 6] and (out / "evals" / "step-3" / "mcq" / "report.json").is_file()
    step3 = out / "snapshots" / "step-3"
    assert scores[3]["eval_mcq_accuracy"] == reference_accuracy(step3, tmp_path / "ref-3")
    assert scores[6]["eval_mcq_accuracy"] == reference_accuracy(result.final_dir, tmp_path / "ref-final")
    assert (out / "loss_curve.png").stat().st_size > 0
    # In process: the hook scores the live model without writing a copy, and gets the same accuracy.
    config = load_config(FFTRecipeConfig, "recipes/configs/demo.yaml", tiny_overrides(tiny_run_files, out) + [
        f"periodic_eval.mcq={MCQ}", "periodic_eval.limit=8", "evaluate.data=null"])

    def no_copy():
        raise AssertionError("in-process evaluation must not write a snapshot")

    point = EvalPoint(3, load_model(step3).eval(), ChatTemplate.from_pretrained(step3), tmp_path / "live", False,
                      True, no_copy)
    live = periodic_hook(config.periodic_eval)(point)
    assert live.pop("eval_mcq_accuracy") == scores[3]["eval_mcq_accuracy"]
    # ...and the per-category table (W&B) is the snapshot evaluation's report.json, row for row
    report = json.loads((out / "evals" / "step-3" / "mcq" / "report.json").read_text())
    assert live == {"tables": {"eval_mcq_categories": [{"category": name, **row}
                                                       for name, row in report["categories"].items()]}}


@pytest.mark.slow
def test_judge_during_training_logs_normalised_score_and_code_checks(tiny_run_files, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(line for line in open("recipes/data/judge_demo.jsonl", encoding="utf-8")
                             if '"lam_theo_chi_dan-01"' in line or '"goi_ham-01"' in line), encoding="utf-8")
    with ChatServer(ScriptedBackend(lambda r: "Ổn. [[6]]", name="judge"), port=0) as judge:
        _, scores = train_with(tiny_run_files, tmp_path / "run", "periodic_eval.mcq=null",
                               "periodic_eval.judge=recipes/configs/judge.yaml",
                               f"periodic_eval.judge_overrides=[data.path={items}, generation.max_tokens=4, "
                               f"'judge.endpoint={{base_url: {judge.url}, model: judge}}', client.cache_dir=null]")
    assert sorted(scores) == [3, 6]
    for record in scores.values():
        assert record["eval_judge_score"] == 0.6  # mean rating 6 / 10
        assert 0 <= record["eval_if_prompt_accuracy"] <= 1 and record["eval_fc_accuracy"] == 0  # 4 tokens: no call
    report = json.loads((tmp_path / "run" / "evals" / "step-6" / "judge" / "report.json").read_text())
    assert set(report["checks"]["step-6"]) == {"instruction_following", "function_calling"}


@pytest.mark.parametrize("rows, message", [
    ([{"id": "q-1", "question": "1+1?", "choices": ["1", "2"], "answer": "B"},
      {"id": "q-2", "question": "2+2?", "choices": ["3", "4"]}], r"mcq.jsonl:2.*'answer' is missing here"),
    ([{"id": "q-1", "question": "1+1?", "choices": "A. 1 B. 2", "answer": "B"}], r"mcq.jsonl:1.*'choices' must be"),
])
def test_a_bad_mcq_file_is_refused_before_training_starts(tiny_run_files, tmp_path, rows, message):
    from qforge.engine.errors import DataError

    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(FFTRecipeConfig, "recipes/configs/demo.yaml", tiny_overrides(tiny_run_files, tmp_path / "run")
                         + [f"periodic_eval.mcq={mcq}", "evaluate.data=null"])
    with pytest.raises(DataError, match=rf"periodic_eval: .*{message}.*; fix the file \(it is read before training"):
        periodic_hook(config.periodic_eval)
    assert not (tmp_path / "run").exists()


def test_a_bad_judge_items_file_is_refused_before_training_starts(tiny_run_files, tmp_path):
    from qforge.engine.errors import DataError

    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "a", "task": "chat"}) + "\n")  # neither prompt nor messages
    config = load_config(FFTRecipeConfig, "recipes/configs/demo.yaml", tiny_overrides(tiny_run_files, tmp_path / "run")
                         + ["periodic_eval.mcq=null", "periodic_eval.judge=recipes/configs/judge.yaml",
                            f"periodic_eval.judge_overrides=[data.path={items}]", "evaluate.data=null"])
    with pytest.raises(DataError, match=r"periodic_eval: .*items.jsonl:1.*needs 'prompt'"):
        periodic_hook(config.periodic_eval)
