"""Report writers and the checkpoint comparison (model selection) on hand-made reports."""
import json

import pytest

from qforge.recipes.report import compare, main, markdown_table


def report(model, benchmark, accuracy, mode="official"):
    return {"model": model, "benchmark": benchmark, "mode": mode,
            "overall": {"accuracy": accuracy, "correct": 0, "total": 0, "no_answer": 0}}


def test_selection_uses_benchmarks_every_model_has():
    reports = [report("base", "vmlu", 0.30), report("base", "mcq_demo", 0.40), report("tuned", "vmlu", 0.35),
               report("tuned", "mcq_demo", 0.55), report("pruned", "vmlu", 0.34), report("pruned", "mcq_demo", 0.50),
               report("tuned", "extra", 0.99)]
    result = compare(reports)
    assert result["shared_benchmarks"] == ["mcq_demo (official)", "vmlu (official)"]
    assert result["average"] == pytest.approx({"base": 0.35, "tuned": 0.45, "pruned": 0.42})
    assert result["best"] == "tuned"  # its 0.99 on "extra" does not count: not every model ran it


def test_duplicate_reports_are_an_error():
    with pytest.raises(ValueError, match="two reports for model 'base'"):
        compare([report("base", "vmlu", 0.3), report("base", "vmlu", 0.4)])


def test_compare_cli_writes_table_chart_and_selection_line(tmp_path):
    paths = []
    for model, accuracy in (("base", 0.25), ("tuned", 0.5)):
        path = tmp_path / f"{model}.json"
        path.write_text(json.dumps(report(model, "mcq_demo", accuracy)))
        paths.append(str(path))
    main(paths + ["--out", str(tmp_path / "cmp")])
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| 1 | tuned | 50.00 | 50.00 |" in text and "Model selection: `tuned`" in text
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_markdown_table_formats_floats():
    assert markdown_table(["a", "b"], [["x", 1.0 / 3]]) == "| a | b |\n|---|---|\n| x | 0.33 |\n"


def judge_report(candidate_means, checks=None):
    return {"mode": "single", "results": {c: {"overall": {"mean": m}, "tasks": {}} for c, m in candidate_means.items()},
            "checks": checks or {}}


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_ranks_checkpoints_of_runs_by_mean_of_vmlu_and_judge(tmp_path, capsys):
    """The team's rule: the mean of VMLU accuracy and the judge's normalised score, over runs × checkpoints."""
    numbers = {("exp1", 100): (0.40, 6.0), ("exp1", 200): (0.50, 6.5), ("exp2", 100): (0.60, 5.0)}
    for (run, step), (accuracy, mean) in numbers.items():
        write(tmp_path / run / "evals" / f"step-{step}" / "mcq" / "report.json", report(f"step-{step}", "vmlu", accuracy))
        write(tmp_path / run / "evals" / f"step-{step}" / "judge" / "report.json", judge_report(
            {f"step-{step}": mean}, {f"step-{step}": {"function_calling": {"overall": {"correct": 0.5}}}}))
    write(tmp_path / "exp3" / "evals" / "step-50" / "mcq" / "report.json", report("step-50", "vmlu", 0.9))  # no judge
    main([str(tmp_path / run) for run in ("exp1", "exp2", "exp3")] + [
        "--out", str(tmp_path / "cmp"), "--combine", "vmlu*", "--combine", "judge"])
    result = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    expected = {f"{run}/step-{step}": (accuracy + mean / 10) / 2 for (run, step), (accuracy, mean) in numbers.items()}
    assert result["average"] == pytest.approx(expected)
    assert result["ranking"] == ["exp1/step-200", "exp2/step-100", "exp1/step-100"]
    assert result["incomplete"] == {"exp3/step-50": ["judge"]}  # listed, not ranked
    assert result["accuracy"]["exp1/step-200"]["function calling"] == 0.5
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "Model selection: `exp1/step-200`" in text and "1×vmlu* + 1×judge" in text
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # Weights: VMLU counted three times as much as the judge.
    weighted = compare([report("a", "vmlu", 0.8), judge_report({"a": 2.0}), report("b", "vmlu", 0.5),
                        judge_report({"b": 9.0})], {"vmlu*": 3, "judge": 1})
    assert weighted["average"] == pytest.approx({"a": (3 * 0.8 + 0.2) / 4, "b": (3 * 0.5 + 0.9) / 4})
    assert weighted["best"] == "a"
    with pytest.raises(ValueError, match="matches several metrics"):
        compare([report("a", "vmlu", 0.8), report("a", "vmlu", 0.7, mode="loglik")], {"vmlu*": 1})
    (tmp_path / "empty").mkdir()
    for path, message in (("nothing-here", "nothing-here: no such file or directory"), ("empty", "no report.json found")):
        with pytest.raises(SystemExit):
            main([str(tmp_path / path), "--out", str(tmp_path / "x")])
        assert message in capsys.readouterr().err
