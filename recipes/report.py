"""Reports for evaluation and judging: JSON, Markdown tables and bar-chart PNGs, written atomically.

Model selection across runs and checkpoints (e.g. 40 experiments, each evaluated during training):

    python recipes/report.py --out runs/compare runs/exp-*/ runs/base/*/report.json \
        --combine 'vmlu*' --combine judge

reads evaluation reports (accuracy; mean over k samples when sampled) and judge reports (mean rating / 10 or
win rate, instruction-following and function-calling accuracy), names reports written during training
`RUN/step-N`, and writes `comparison.md` (one ranked table), `comparison.json` and `comparison.png`. The
ranking is by the weighted mean of the `--combine` metrics (fnmatch patterns, `PATTERN=WEIGHT`), e.g. the
mean of VMLU accuracy and the judge's normalised score; without it, by the mean over the metrics every model has.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from qforge.recipes.common.files import atomic_write, write_json, write_text


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


def report_scores(report: dict, model: str | None = None) -> dict[str, dict[str, float]]:
    """{model: {metric: score in [0, 1]}} from an evaluation report (recipes/eval.py: its accuracy, the mean
    over k samples when sampled) or a judge report (recipes/judge.py: mean rating / 10 or the win rate, plus
    the code-checked instruction-following prompt accuracy and function-calling accuracy). `model` renames the
    (single) model, e.g. "run/step-200" for a report written during training."""
    if "benchmark" in report:
        sampled = report.get("sampled") or {}
        value = sampled["mean_accuracy"] if sampled.get("samples", 1) > 1 else report["overall"]["accuracy"]
        return {model or report["model"]: {f"{report['benchmark']} ({report['mode']})": value}}
    if "results" not in report:
        raise ValueError("neither an evaluation report (benchmark) nor a judge report (results)")
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for name, result in report["results"].items():
        if report["mode"] == "single":
            table[name]["judge"] = result["overall"]["mean"] / 10
        else:
            candidate, baseline = name.split(" vs ", 1)
            table[candidate][f"judge (win rate vs {baseline})"] = result["overall"]["win_rate"]
    for name, checks in (report.get("checks") or {}).items():
        if "instruction_following" in checks:
            table[name]["instruction following"] = checks["instruction_following"]["overall"]["prompt_accuracy"]
        if "function_calling" in checks:
            table[name]["function calling"] = checks["function_calling"]["overall"]["correct"]
    if model is not None:
        if len(table) > 1:
            raise ValueError(f"cannot name {len(table)} judged candidates {sorted(table)} as one model {model!r}")
        return {model: next(iter(table.values()), {})}
    return dict(table)


def _metric_of(model: str, metrics: dict[str, float], pattern: str) -> str | None:
    found = [m for m in metrics if fnmatch.fnmatchcase(m, pattern)]
    if len(found) > 1:
        raise ValueError(f"--combine {pattern!r} matches several metrics of {model!r}: {found}; be more specific")
    return found[0] if found else None


def compare(reports: Sequence[dict], combine: dict[str, float] | None = None,
            names: Sequence[str | None] | None = None) -> dict:
    """Model × metric table and the model selection.

    Without `combine`: the mean over the metrics every model has (the best model by mean accuracy over shared
    benchmarks). With `combine` ({metric pattern: weight}, fnmatch patterns such as "vmlu*" or "judge"): each
    model's weighted mean of those metrics, e.g. {"vmlu*": 1, "judge": 1} is the mean of VMLU accuracy and the
    judge's normalised score; models missing one are listed but not ranked."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for report, name in zip(reports, names or [None] * len(reports)):
        for model, metrics in report_scores(report, name).items():
            for metric, value in metrics.items():
                if metric in table[model]:
                    raise ValueError(f"two reports for model {model!r} on {metric}")
                table[model][metric] = value
    benchmarks = sorted({b for row in table.values() for b in row})
    shared = [b for b in benchmarks if all(b in row for row in table.values())]
    if combine:
        averages, incomplete = {}, {}
        for model, row in table.items():
            chosen = {pattern: _metric_of(model, row, pattern) for pattern in combine}
            missing = [pattern for pattern, metric in chosen.items() if metric is None]
            if missing:
                incomplete[model] = missing
                continue
            total = sum(combine.values())
            averages[model] = sum(weight * row[chosen[p]] for p, weight in combine.items()) / total
        rule = " + ".join(f"{w:g}×{p}" for p, w in combine.items()) + f" (÷ {sum(combine.values()):g})"
    else:
        averages = {model: sum(row[b] for b in shared) / len(shared) for model, row in table.items()} if shared else {}
        incomplete, rule = {}, None
    ranking = sorted(averages, key=averages.get, reverse=True)
    return {"benchmarks": benchmarks, "shared_benchmarks": shared, "accuracy": dict(table), "average": averages,
            "ranking": ranking, "best": ranking[0] if ranking else None, "combine": combine, "rule": rule,
            "incomplete": incomplete}


def comparison_markdown(result: dict) -> str:
    score = "Combined score" if result["rule"] else "Average (shared)"
    header = ["Rank", "Model"] + result["benchmarks"] + [score]
    order = result["ranking"] + [m for m in result["accuracy"] if m not in result["average"]]
    rows = [[result["ranking"].index(m) + 1 if m in result["average"] else "—", m]
            + [100 * result["accuracy"][m][b] if b in result["accuracy"][m] else "—" for b in result["benchmarks"]]
            + [100 * result["average"][m] if m in result["average"] else "—"] for m in order]
    text = "# Model selection (scores in %)\n\n" + markdown_table(header, rows)
    for model, missing in result["incomplete"].items():
        text += f"\n`{model}` is not ranked: no metric matches {missing}."
    if result["best"] is None:
        return text + "\nNo model has every metric the selection needs: no selection.\n"
    why = (f"best combined score {result['rule']}" if result["rule"] else
           f"best average accuracy over {len(result['shared_benchmarks'])} benchmark(s) every model was evaluated on")
    return text + (f"\n**Model selection: `{result['best']}`** — {why} "
                   f"({100 * result['average'][result['best']]:.2f}%).\n")


def collect_reports(paths: Sequence[str]) -> tuple[list[dict], list[str | None]]:
    """Reads report.json files; a directory contributes every report.json below it. A report written during
    training (`RUN/evals/step-N/<kind>/report.json`) is named after its run and step, `RUN/step-N`."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"{path}: no such file or directory")
        files += sorted(path.rglob("report.json")) if path.is_dir() else [path]
    reports, names = [], []
    for file in files:
        try:
            reports.append(json.loads(file.read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise ValueError(f"{file}: cannot read a report ({error})") from None
        parts = file.parts
        during = len(parts) >= 5 and parts[-4] == "evals" and parts[-3].startswith("step-")
        names.append(f"{parts[-5]}/{parts[-3]}" if during else None)
    if not reports:
        raise ValueError(f"no report.json found in {list(paths)}")
    return reports, names


def parse_combine(items: Sequence[str]) -> dict[str, float] | None:
    combine = {}
    for item in items:
        pattern, _, weight = item.partition("=")
        try:
            combine[pattern] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--combine {item!r}: the weight after '=' must be a number") from None
    return combine or None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rank runs and checkpoints by their evaluation and judge reports.")
    parser.add_argument("reports", nargs="+", help="report.json files (recipes/eval.py, recipes/judge.py) or run "
                                                   "directories (every report.json below, e.g. evals/step-N/...)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--combine", action="append", default=[], metavar="METRIC[=WEIGHT]",
                        help="rank by the weighted mean of these metrics (fnmatch patterns), e.g. --combine 'vmlu*' "
                             "--combine judge; default: the mean over the metrics every model has")
    args = parser.parse_args(argv)
    try:
        reports, names = collect_reports(args.reports)
        result = compare(reports, parse_combine(args.combine), names)
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out)
    write_json(out / "comparison.json", result)
    write_text(out / "comparison.md", comparison_markdown(result))
    models = result["ranking"] + [m for m in result["accuracy"] if m not in result["average"]]
    series = {m: [100 * result["accuracy"][m].get(b, 0.0) for b in result["benchmarks"]]
              + [100 * result["average"].get(m, 0.0)] for m in models}
    bar_chart(out / "comparison.png", result["benchmarks"] + ["combined" if result["rule"] else "average"], series,
              title="model selection", ylabel="score (%)", ylim=(0, 100))
    print(comparison_markdown(result))


if __name__ == "__main__":
    main()
