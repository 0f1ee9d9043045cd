"""Evaluation during training: at every `train.eval_every` steps and after the last step, the FFT recipe scores
the current weights on a multiple-choice set (recipes/eval.py) and, optionally, with the LLM judge
(recipes/judge.py, single ratings plus the code checks of instruction following and function calling).

    periodic_eval:
      mcq: recipes/data/mcq_demo.jsonl   # VMLU-format questions; null: no MCQ evaluation
      eval: {mode: loglik}               # recipes/eval.py's `eval:` settings (think mode samples, k samples, ...)
      judge: recipes/configs/judge.yaml  # optional: the judge config; its candidates become this step's model
      where: in_process                  # or snapshot: evaluate an HF-format copy written at that step

`in_process` evaluates the live model (no copy; single process only). `snapshot` writes
`output.dir/snapshots/step-N` and evaluates that, which is what a distributed (FSDP) run and the judge (it
serves the candidate from a checkpoint directory) always use. Reports go to `output.dir/evals/step-N/{mcq,judge}`;
the scores are logged to metrics.jsonl / TensorBoard / the loss plot as `eval_mcq_accuracy`,
`eval_judge_score` (mean rating / 10), `eval_if_prompt_accuracy` and `eval_fc_accuracy`, where recipes/report.py
finds them for model selection.
"""
from __future__ import annotations

from dataclasses import asdict, field
from pathlib import Path
from typing import Callable, Literal

from qforge.engine.serve.chat import ChatModel
from qforge.engine.config_io import apply_overrides, build, read_yaml, settings
from qforge.engine.errors import DataError, QforgeError
from qforge.engine.train import EvalPoint
from qforge.recipes import eval as mcq_eval
from qforge.recipes import judge as judge_recipe
from qforge.recipes.evals.mcq import DEFAULT_SUBJECTS, read_questions, read_subjects
from qforge.recipes.evals.verdicts import read_items


def _loglik() -> mcq_eval.EvalSettings:
    return mcq_eval.EvalSettings(mode="loglik")


@settings
class PeriodicEvalSettings:
    mcq: str | None = None  # multiple-choice JSONL evaluated on the current weights
    subjects: str = str(DEFAULT_SUBJECTS)
    limit: int | None = None  # first N questions only
    eval: mcq_eval.EvalSettings = field(default_factory=_loglik)
    judge: str | None = None  # a judge config YAML (recipes/configs/judge.yaml)
    judge_overrides: list[str] = field(default_factory=list)  # key=value overrides of that config
    where: Literal["in_process", "snapshot"] = "in_process"

    def __post_init__(self):
        for key, path in (("periodic_eval.mcq", self.mcq), ("periodic_eval.judge", self.judge)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{key}: no such file {path!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.mcq or self.judge)


def evaluate_mcq(settings: PeriodicEvalSettings, point: EvalPoint, path: Path | None, out: Path) -> dict:
    name = f"step-{point.step}"
    config = build(mcq_eval.EvalConfig, {
        "model": {"path": str(path or point.output_dir), "name": name},
        "data": {"path": settings.mcq, "subjects": settings.subjects, "limit": settings.limit},
        "eval": asdict(settings.eval), "output": {"dir": str(out)}}, "periodic_eval")
    chat_model = None if path else ChatModel(point.model, point.template, batch_size=settings.eval.batch_size)
    report = mcq_eval.run(config, chat_model)
    sampled = report["sampled"]
    categories = [{"category": name, **scores} for name, scores in report.get("categories", {}).items()]
    return {"eval_mcq_accuracy": sampled["mean_accuracy"] if sampled["samples"] > 1 else report["overall"]["accuracy"],
            "tables": {"eval_mcq_categories": categories}}


def _judge_config(settings: PeriodicEvalSettings, name: str, path: Path, out: Path) -> judge_recipe.JudgeConfig:
    raw = apply_overrides(read_yaml(settings.judge), settings.judge_overrides)
    raw["candidates"] = [{"name": name, "endpoint": {"path": str(path)}}]
    raw.setdefault("judge", {})["mode"] = "single"
    raw["output"] = {"dir": str(out)}
    return build(judge_recipe.JudgeConfig, raw, settings.judge)


def check_files(settings: PeriodicEvalSettings):
    """Reads the MCQ set and the judge's config and items once before training starts: a bad row found at the
    first evaluation would stop a run that already trained for hours."""
    try:
        if settings.mcq:
            read_questions(settings.mcq, read_subjects(settings.subjects))
        if settings.judge:
            read_items(_judge_config(settings, "check", Path(settings.judge), Path(settings.judge)).data.path)
    except QforgeError:
        raise
    except (ValueError, OSError) as error:
        raise DataError(f"periodic_eval: {error}; fix the file (it is read before training starts)") from None


def evaluate_judge(settings: PeriodicEvalSettings, point: EvalPoint, path: Path, out: Path) -> dict:
    name = f"step-{point.step}"
    report = judge_recipe.run(_judge_config(settings, name, path, out))
    result = report["results"][name]
    metrics = {"eval_judge_score": result["overall"]["mean"] / 10,
               "tables": {"eval_judge_tasks": [{"task": task, **{k: v for k, v in scores.items()
                                                               if isinstance(v, (int, float))}}
                                               for task, scores in result["tasks"].items()]}}
    checks = report["checks"].get(name, {})
    if "instruction_following" in checks:
        metrics["eval_if_prompt_accuracy"] = checks["instruction_following"]["overall"]["prompt_accuracy"]
    if "function_calling" in checks:
        metrics["eval_fc_accuracy"] = checks["function_calling"]["overall"]["correct"]
    return metrics


def periodic_hook(settings: PeriodicEvalSettings) -> Callable[[EvalPoint], dict] | None:
    """The `evaluate` hook for `qforge.engine.train.train`, or None when nothing is configured."""
    if not settings.enabled:
        return None
    check_files(settings)

    def hook(point: EvalPoint) -> dict:
        needs_copy = settings.where == "snapshot" or point.distributed or settings.judge is not None
        path = point.snapshot() if needs_copy else None  # every rank takes part in writing the copy
        if not point.is_main:
            return {}
        out = point.output_dir / "evals" / f"step-{point.step}"
        metrics, tables = {}, {}
        if settings.mcq:
            metrics.update(evaluate_mcq(settings, point, path if settings.where == "snapshot" or point.distributed
                                        else None, out / "mcq"))
            tables.update(metrics.pop("tables"))
        if settings.judge:
            metrics.update(evaluate_judge(settings, point, path, out / "judge"))
            tables.update(metrics.pop("tables"))
        return {**metrics, "tables": tables}

    return hook
