"""Curate an existing SFT corpus: language, quality and length rules, dedup, task labels, per-task quotas.

    python recipes/curate.py --config recipes/configs/curate.yaml output.dir=runs/curate [key=value ...]

Reads JSONL/JSON/Parquet files in OpenAI `messages` or ShareGPT form; labels each conversation with a task
by keyword rules, then (optionally) by an LLM classifier through the same caching client as the other
recipes; samples `sampling.target` rows with per-task quotas. Writes curated.jsonl, drops.jsonl,
report.json, report.md and mixture.yaml: a config fragment with the FFT recipe's `data.train` and
`data.weights` (the curated file plus any extra datasets, e.g. the synthesis recipe's output).
"""
from __future__ import annotations

import sys
import json
import random
import re
from collections import Counter
from dataclasses import asdict, field
from pathlib import Path
from typing import Literal

import yaml
from tqdm.auto import tqdm

from qforge.engine.data.formats import RowError, read_conversations
from qforge.engine.config_io import settings
from qforge.recipes.common.cli import OutputDirSettings, print_report_md, run_recipe
from qforge.recipes.common.endpoint import ClientSettings, EndpointSettings, open_endpoint, response_cache_dir
from qforge.recipes.common.files import write_json, write_jsonl, write_text
from qforge.recipes.sft_data.dedup import Deduplicator
from qforge.recipes.sft_data.filters import Malformed, TextRules
from qforge.recipes.sft_data.report import count_by_task, counts_markdown
from qforge.recipes.sft_data.stages import Usage, ask_all, check_placeholders, conversation

UNLABELLED = "unlabelled"  # rows no keyword rule matched, before the classifier (if any) has seen them


@settings
class InputFile:
    path: str
    format: Literal["auto", "messages", "sharegpt"] = "auto"
    limit: int | None = None  # only the first N rows (smoke runs)


@settings
class Quality:
    prompt: TextRules = field(default_factory=lambda: TextRules(min_chars=5, max_chars=8000))  # first user turn
    answer: TextRules = field(default_factory=lambda: TextRules(min_chars=20, max_chars=16000))  # last assistant
    min_messages: int = 2
    max_messages: int = 32
    banned_phrases: list[str] = field(default_factory=list)  # case-insensitive, anywhere in an assistant turn
    max_repeated_lines: float = 0.3  # fraction of an answer's non-blank lines that repeat an earlier line
    dedup_on: Literal["prompt", "conversation"] = "prompt"
    near_duplicate_threshold: float | None = 0.7


@settings
class KeywordRule:
    task: str
    patterns: list[str]  # regular expressions, case-insensitive, searched in the first user turn

    def __post_init__(self):
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"tasks.rules[{self.task}]: bad pattern {pattern!r} ({error})") from None


@settings
class Classifier:
    endpoint: EndpointSettings = field(default_factory=EndpointSettings)
    system: str = ""
    user: str = ""  # placeholders: {prompt} (the first user turn, cut to prompt_chars), {labels}
    retry: str = ""  # after an unusable reply; {error}
    retries: int = 1
    max_tokens: int = 16
    prompt_chars: int = 2000
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        self.endpoint.check("tasks.classifier.endpoint")
        for part in ("system", "user"):
            check_placeholders(getattr(self, part), {"prompt", "labels"}, f"tasks.classifier.{part}")
        check_placeholders(self.retry, {"error"}, "tasks.classifier.retry")


@settings
class TaskSettings:
    rules: list[KeywordRule] = field(default_factory=list)  # first matching rule wins
    labels: list[str] = field(default_factory=list)  # the classifier's choices (default: the rules' tasks)
    classifier: Classifier | None = None  # labels rows no rule matched; without it they become `default`
    default: str = "other"
    keep: list[str] | None = None  # only these tasks (default: all)


@settings
class Sampling:
    target: int | None = None  # rows to keep (default: every row that passes)
    quotas: dict = field(default_factory=dict)  # task -> rows (int) or share of target (float < 1)
    seed: int = 0


@settings
class MixtureEntry:
    path: str
    weight: float = 1.0


@settings
class Mixture:
    weight: float = 1.0  # epoch multiplier of the curated file
    extra: list[MixtureEntry] = field(default_factory=list)  # other datasets in the mix


@settings
class CurateConfig:
    inputs: list[InputFile] = field(default_factory=list)
    quality: Quality = field(default_factory=Quality)
    tasks: TaskSettings = field(default_factory=TaskSettings)
    sampling: Sampling = field(default_factory=Sampling)
    mixture: Mixture = field(default_factory=Mixture)
    client: ClientSettings = field(default_factory=ClientSettings)  # cache_dir default: output.dir/cache
    output: OutputDirSettings = field(default_factory=OutputDirSettings)

    def __post_init__(self):
        if not self.inputs or not self.output.dir:
            raise ValueError("inputs (at least one file) and output.dir are required")
        for task, quota in self.sampling.quotas.items():
            if isinstance(quota, bool) or not isinstance(quota, (int, float)) or quota <= 0 \
                    or (isinstance(quota, float) and quota >= 1):
                raise ValueError(f"sampling.quotas.{task} must be a row count or a share in (0, 1), got {quota!r}")
        if any(isinstance(q, float) for q in self.sampling.quotas.values()) and not self.sampling.target:
            raise ValueError("sampling.quotas given as shares need sampling.target")


def read_rows(inputs: list[InputFile]) -> tuple[list[dict], list[dict]]:
    rows, drops = [], []
    for source in inputs:
        taken = 0
        for line, messages in read_conversations(source.path, source.format):
            if source.limit is not None and taken >= source.limit:
                break
            taken += 1
            row_id = f"{source.path}:{line}"
            if isinstance(messages, RowError):
                drops.append(_drop(row_id, UNLABELLED, "bad_row", str(messages)))
            else:
                rows.append({"id": row_id, "messages": messages, "source": {"path": source.path, "line": line}})
    return rows, drops


def first_user(messages: list[dict]) -> str:
    return next((m["content"] for m in messages if m["role"] == "user"), "")


def repeated_line_fraction(text: str) -> float:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


def quality_problem(messages: list[dict], rules: Quality) -> str | None:
    """The first rule a conversation breaks, or None."""
    if not rules.min_messages <= len(messages) <= rules.max_messages:
        return "message_count"
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    problem = rules.prompt.check(first_user(messages), "prompt") or rules.answer.check(answers[-1], "answer")
    if problem:
        return problem
    lowered = " ".join(answers).lower()
    if any(phrase.lower() in lowered for phrase in rules.banned_phrases):
        return "banned_phrase"
    if repeated_line_fraction(answers[-1]) > rules.max_repeated_lines:
        return "repetitive_answer"
    return None


def keyword_task(prompt: str, rules: list[KeywordRule]) -> str | None:
    return next((rule.task for rule in rules if any(re.search(p, prompt, re.IGNORECASE) for p in rule.patterns)),
                None)


def classify(config: CurateConfig, rows: list[dict], labels: list[str], cache_dir: str) -> dict:
    """Labels `rows` in place with the LLM classifier; rows whose label stays unusable get tasks.default."""
    settings = config.tasks.classifier
    fields = [{"prompt": first_user(r["messages"])[:settings.prompt_chars], "labels": ", ".join(labels)} for r in rows]
    conversations = [conversation(settings.system, settings.user, f) for f in fields]

    def parse(_, reply):
        found = {label for label in labels
                 if re.search(rf"(?<!\w){re.escape(label)}(?!\w)", reply.content, re.IGNORECASE)}
        if len(found) != 1:
            raise Malformed(f"expected exactly one of {labels}, got {reply.content.strip()[:80]!r}")
        return found.pop()

    usage = Usage()
    options = {**asdict(config.client), "cache_dir": cache_dir}
    with open_endpoint(settings.endpoint, **options) as client:
        answers = ask_all(client, conversations, [f"classify:{r['id']}" for r in rows], parse,
                          retries=settings.retries, retry_prompt=settings.retry, usage=usage, desc="classify",
                          params={"max_tokens": settings.max_tokens, **settings.params})
        model = client.model
    for row, answer in zip(rows, answers):
        row["task"] = answer.value or config.tasks.default
        row["labelled_by"] = "classifier" if answer.value else f"default ({answer.reason})"
    return {**asdict(usage), "model": model}


def quota_rows(quota: int | float, target: int | None) -> int:
    return quota if isinstance(quota, int) else round(quota * target)


def sampling_summary(kept: list[dict], settings: Sampling) -> dict:
    """The target and quotas against what was kept: a corpus too small for them shows here."""
    counts = Counter(row["task"] for row in kept)
    quotas = {task: {"wanted": quota_rows(quota, settings.target), "kept": counts[task]}
              for task, quota in settings.quotas.items()}
    return {"target": settings.target, "kept": len(kept), "quotas": quotas,
            "short": sorted(task for task, q in quotas.items() if q["kept"] < q["wanted"])}


def sample(rows: list[dict], settings: Sampling) -> tuple[list[dict], list[dict]]:
    """Per-task quotas first (rows, or shares of the target), then the rest of the target from the other
    tasks' rows, uniformly; everything not drawn is dropped as over_quota/not_sampled."""
    if settings.target is None and not settings.quotas:
        return rows, []
    rng = random.Random(settings.seed)
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    chosen, drops = [], []
    for task, quota in settings.quotas.items():
        pool = by_task.pop(task, [])
        want = quota_rows(quota, settings.target)
        rng.shuffle(pool)
        chosen += pool[:want]
        drops += [_drop(r["id"], task, "over_quota", f"quota {want}") for r in pool[want:]]
    rest = [row for pool in by_task.values() for row in pool]
    room = len(rest) if settings.target is None else max(0, settings.target - len(chosen))
    rng.shuffle(rest)
    chosen += rest[:room]
    drops += [_drop(r["id"], r["task"], "not_sampled", f"target {settings.target}") for r in rest[room:]]
    order = {row["id"]: i for i, row in enumerate(rows)}
    return sorted(chosen, key=lambda r: order[r["id"]]), drops


def run(config: CurateConfig) -> dict:
    out = Path(config.output.dir)
    rows, drops = read_rows(config.inputs)
    quality = config.quality
    dedup = Deduplicator(quality.near_duplicate_threshold)
    passed = []
    for row in tqdm(rows, desc="filter"):
        prompt = first_user(row["messages"])
        row["task"] = keyword_task(prompt, config.tasks.rules) or UNLABELLED
        problem, detail = quality_problem(row["messages"], quality), ""
        if not problem:
            text = prompt if quality.dedup_on == "prompt" else "\n".join(m["content"] for m in row["messages"])
            duplicate = dedup.check(row["id"], text)
            if duplicate:
                problem, detail = duplicate[0], f"of {duplicate[1]}"
        if problem:
            drops.append(_drop(row["id"], row["task"], problem, detail))
        else:
            row["labelled_by"] = "keywords" if row["task"] != UNLABELLED else None
            passed.append(row)

    usage = None
    unlabelled = [row for row in passed if row["task"] == UNLABELLED]
    if unlabelled and config.tasks.classifier is not None:
        labels = config.tasks.labels or sorted({rule.task for rule in config.tasks.rules} | {config.tasks.default})
        usage = classify(config, unlabelled, labels, response_cache_dir(config.client, out))
    for row in unlabelled:
        if row["task"] == UNLABELLED:
            row["task"], row["labelled_by"] = config.tasks.default, "default"

    wanted = []
    for row in passed:
        if config.tasks.keep is None or row["task"] in config.tasks.keep:
            wanted.append(row)
        else:
            drops.append(_drop(row["id"], row["task"], "task_not_kept", ""))
    kept, sampling_drops = sample(wanted, config.sampling)
    drops += sampling_drops
    return write_outputs(config, out, kept, drops, usage)


def write_outputs(config: CurateConfig, out: Path, kept: list[dict], drops: list[dict], usage: dict | None) -> dict:
    curated = out / "curated.jsonl"
    write_jsonl(curated, [{"id": r["id"], "messages": r["messages"], "task": r["task"],
                           "labelled_by": r["labelled_by"], "source": r["source"]} for r in kept])
    write_jsonl(out / "drops.jsonl", drops)
    mixture = {"data": {"train": [str(curated), *(e.path for e in config.mixture.extra)],
                        "weights": [config.mixture.weight, *(e.weight for e in config.mixture.extra)]}}
    write_text(out / "mixture.yaml", "# FFT config fragment written by recipes/curate.py: data.train and its\n"
                                     "# per-file epoch multipliers data.weights.\n"
               + yaml.safe_dump(mixture, allow_unicode=True, sort_keys=False))
    counts = count_by_task(kept, drops)
    overrides = " ".join(f"'data.{key}={json.dumps(value, ensure_ascii=False)}'"
                         for key, value in mixture["data"].items())
    sampling = sampling_summary(kept, config.sampling)
    report = {"counts": counts, "sampling": sampling, "classifier_usage": usage, "mixture": mixture,
              "fft_overrides": overrides, "config": asdict(config)}
    write_json(out / "report.json", report)
    write_text(out / "report.md", "# Curation report\n\nRows per task kept or dropped, by reason (rows dropped "
                                  f"before labelling count under '{UNLABELLED}'):\n\n" + counts_markdown(counts)
               + f"\nKept {sampling['kept']} rows (target: {sampling['target']}); quotas not filled: "
                 f"{', '.join(sampling['short']) or 'none'}.\n"
               + f"\nMixture ({out / 'mixture.yaml'}); train on it with\n\n"
                 f"    python recipes/fft.py --config FFT_CONFIG.yaml {overrides}\n")
    return report


def _drop(row_id: str, task: str, reason: str, detail: str) -> dict:
    return {"id": row_id, "task": task, "reason": reason, "detail": detail}


def main(argv: list[str] | None = None) -> int:
    return run_recipe(CurateConfig, run, argv, __doc__.split("\n\n")[0], "sampling.target=5000", report=print_report_md)


if __name__ == "__main__":
    sys.exit(main())
