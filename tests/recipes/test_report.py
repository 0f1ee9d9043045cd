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
    assert "| tuned | 50.00 | 50.00 |" in text and "Model selection: `tuned`" in text
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_markdown_table_formats_floats():
    assert markdown_table(["a", "b"], [["x", 1.0 / 3]]) == "| a | b |\n|---|---|\n| x | 0.33 |\n"
