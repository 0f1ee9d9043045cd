"""Reports for evaluation and judging: JSON, Markdown tables and bar-chart PNGs, written atomically.

Comparing checkpoints (e.g. base vs fine-tuned vs pruned) across benchmarks:

    python recipes/report.py --out runs/compare runs/base/*/report.json runs/tuned/*/report.json

writes `comparison.md`, `comparison.json` and `comparison.png`, with a model-selection line naming the model
with the best average accuracy over the benchmarks every model was evaluated on.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from qforge.recipes.files import atomic_write, write_json, write_text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bar_chart(path: str | Path, labels: Sequence[str], series: dict[str, Sequence[float]], *, title: str,
              ylabel: str, intervals: dict[str, Sequence[tuple[float, float]]] | None = None,
              ylim: tuple[float, float] | None = None) -> Path:
    """Grouped bars: one group per label, one bar per series; optional (low, high) error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(series)) ** 0.5 + 2), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        errors = None
        if intervals and name in intervals:
            errors = [[v - lo for v, (lo, _) in zip(values, intervals[name])],
                      [hi - v for v, (_, hi) in zip(values, intervals[name])]]
        axes.bar(xs, values, width, label=name, yerr=errors, capsize=3 if errors else 0)
    axes.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right"
                    if len(labels) > 4 else "center")
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    if ylim:
        axes.set_ylim(*ylim)
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, dpi=110, format="png"))
    plt.close(figure)
    return Path(path)


def eval_markdown(report: dict) -> str:
    """One evaluation run: overall, per category and per subject accuracy (in %)."""
    overall = report["overall"]
    lines = [f"# {report['benchmark']} — {report['model']} ({report['mode']})\n",
             f"Overall accuracy: **{100 * overall['accuracy']:.2f}%** ({overall['correct']}/{overall['total']}; "
             f"no answer extracted: {overall['no_answer']}); mean of categories: "
             f"{100 * report['category_average']:.2f}%\n"]
    sampled = report.get("sampled")
    if sampled and sampled["samples"] > 1:
        low, high = sampled["ci"]
        lines.append(f"Mean accuracy over {sampled['samples']} samples per question: "
                     f"**{100 * sampled['mean_accuracy']:.2f}%** (95% CI {100 * low:.2f}–{100 * high:.2f}); "
                     f"the table scores each question's majority answer.\n")
    if "unfinished" in report:
        lines.append(f"Answers unfinished (cut by the token budget): {report['unfinished']}; unparseable: "
                     f"{report['unparseable']}; of {report['answers']}. Sampling: {report.get('sampling')}\n")
    lines.append(markdown_table(["Category", "Accuracy %", "Correct", "Total"], [
        [name, 100 * c["accuracy"], c["correct"], c["total"]] for name, c in report["categories"].items()]))
    lines.append(markdown_table(["Subject", "Category", "Accuracy %", "Correct", "Total"], [
        [name, s["category"], 100 * s["accuracy"], s["correct"], s["total"]] for name, s in report["subjects"].items()]))
    return "\n".join(lines)


def write_eval_report(out_dir: str | Path, report: dict) -> None:
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", eval_markdown(report))
    labels = list(report["categories"]) + ["overall"]
    values = [100 * c["accuracy"] for c in report["categories"].values()] + [100 * report["overall"]["accuracy"]]
    bar_chart(out_dir / "report.png", labels, {report["model"]: values}, ylim=(0, 100), ylabel="accuracy (%)",
              title=f"{report['benchmark']} ({report['mode']})")


def compare(reports: Sequence[dict]) -> dict:
    """Model × benchmark accuracy table; the best model by mean accuracy over shared benchmarks."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for report in reports:
        benchmark = f"{report['benchmark']} ({report['mode']})"
        if benchmark in table[report["model"]]:
            raise ValueError(f"two reports for model {report['model']!r} on {benchmark}")
        table[report["model"]][benchmark] = report["overall"]["accuracy"]
    benchmarks = sorted({b for row in table.values() for b in row})
    shared = [b for b in benchmarks if all(b in row for row in table.values())]
    averages = {model: sum(row[b] for b in shared) / len(shared) for model, row in table.items()} if shared else {}
    best = max(averages, key=averages.get) if averages else None
    return {"benchmarks": benchmarks, "shared_benchmarks": shared, "accuracy": dict(table),
            "average": averages, "best": best}


def comparison_markdown(result: dict) -> str:
    header = ["Model"] + result["benchmarks"] + ["Average (shared)"]
    rows = [[model] + [100 * row[b] if b in row else "—" for b in result["benchmarks"]]
            + [100 * result["average"].get(model, float("nan"))] for model, row in result["accuracy"].items()]
    text = "# Checkpoint comparison (accuracy %)\n\n" + markdown_table(header, rows)
    if result["best"] is None:
        return text + "\nNo benchmark was run on every model: no selection.\n"
    return text + (f"\n**Model selection: `{result['best']}`** — best average accuracy "
                   f"({100 * result['average'][result['best']]:.2f}%) over {len(result['shared_benchmarks'])} "
                   f"benchmark(s) every model was evaluated on.\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare evaluation reports of several checkpoints.")
    parser.add_argument("reports", nargs="+", help="report.json files written by recipes/eval.py")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    reports = []
    for path in args.reports:
        try:
            reports.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            parser.error(f"{path}: cannot read an evaluation report ({error})")
    result = compare(reports)
    out = Path(args.out)
    write_json(out / "comparison.json", result)
    write_text(out / "comparison.md", comparison_markdown(result))
    models = list(result["accuracy"])
    bar_chart(out / "comparison.png", result["benchmarks"],
              {m: [100 * result["accuracy"][m].get(b, 0.0) for b in result["benchmarks"]] for m in models},
              title="accuracy by benchmark", ylabel="accuracy (%)", ylim=(0, 100))
    print(comparison_markdown(result))


if __name__ == "__main__":
    main()
