"""LLM-as-judge: pairwise win rates (both orders, bootstrap intervals) or 1–10 ratings, per task.

    python recipes/judge.py --config recipes/configs/judge.yaml output.dir=runs/judge [key=value ...]

Candidates answer every benchmark prompt (or bring an answers file); the judge, any OpenAI-compatible
endpoint or a local checkpoint, then compares each candidate with the baseline (pairwise) or rates each
answer (single, optionally against the reference answer). Judge prompts live in the config. Items with
verifiable `constraints` (instruction following) or `tools` + `reference_calls` (function calling) are also
checked by code, for every candidate: constraint- and prompt-level accuracy, and right function / valid /
correct arguments. Writes answers/<candidate>.jsonl, judgments.jsonl, report.json, report.md and report.png
to `output.dir`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, field
from pathlib import Path
from typing import Callable, Literal

from qforge.engine.serve.client import ChatClient
from qforge.engine.config_io import settings
from qforge.recipes.common.cli import OutputDirSettings, print_report_md, run_recipe
from qforge.recipes.common.endpoint import ClientSettings, EndpointSettings, open_endpoint
from qforge.recipes.common.files import read_jsonl, write_json, write_jsonl, write_text
from qforge.engine.data.render import render_tool_calls
from qforge.recipes.evals import function_calling, instruction_following
from qforge.recipes.evals.verdicts import (Item, pair_outcome, parse_pairwise, parse_rating, read_items,
                                    summarize_pairwise, summarize_ratings)
from qforge.recipes.report import bar_chart, markdown_table
from qforge.recipes.sft_data.filters import Malformed
from qforge.recipes.sft_data.stages import PLACEHOLDER, Usage, ask_all, conversation

REQUIRED_FIELDS = {"pairwise_user": {"question", "answer_a", "answer_b"}, "single_user": {"question", "answer"},
                   "single_user_reference": {"question", "answer", "reference"}}


@settings
class Candidate:
    name: str
    endpoint: EndpointSettings | None = None
    answers: str | None = None  # JSONL of {"id", "answer"} instead of asking the endpoint
    request_params: dict = field(default_factory=dict)  # extra body fields, e.g. chat_template_kwargs

    def __post_init__(self):
        if (self.endpoint is None) == (self.answers is None):
            raise ValueError(f"candidate {self.name!r}: set exactly one of endpoint or answers")
        if self.endpoint is not None:
            self.endpoint.check(f"candidate {self.name!r}: endpoint")


@settings
class JudgePrompts:
    pairwise_system: str = ""
    pairwise_user: str = ""
    single_system: str = ""
    single_user: str = ""
    single_user_reference: str = ""
    retry: str = ""  # sent after a malformed verdict, before counting it invalid

    def __post_init__(self):
        for name, needed in REQUIRED_FIELDS.items():
            missing = needed - set(PLACEHOLDER.findall(getattr(self, name)))
            if missing:
                raise ValueError(f"judge.prompts.{name} must contain {sorted('{' + m + '}' for m in missing)}")


@settings
class JudgeSettings:
    endpoint: EndpointSettings | None = None
    mode: Literal["pairwise", "single"] = "pairwise"
    baseline: str | None = None  # pairwise: the candidate the others are compared with (default: the first)
    use_reference: bool = True  # single: show the reference answer when the item has one
    retries: int = 2  # re-asks after a malformed verdict
    max_tokens: int = 1024
    temperature: float = 0.0
    request_params: dict = field(default_factory=dict)
    prompts: JudgePrompts = field(default_factory=JudgePrompts)


@settings
class GenerationSettings:
    max_tokens: int = 1024
    temperature: float = 0.0


@settings
class BootstrapSettings:
    samples: int = 1000
    seed: int = 0
    confidence: float = 0.95


@settings
class JudgeDataSettings:
    path: str | None = None
    limit: int | None = None


@settings
class JudgeConfig:
    data: JudgeDataSettings = field(default_factory=JudgeDataSettings)
    candidates: list[Candidate] = field(default_factory=list)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    client: ClientSettings = field(default_factory=ClientSettings)
    output: OutputDirSettings = field(default_factory=OutputDirSettings)

    def __post_init__(self):
        for key, value in (("data.path", self.data.path), ("output.dir", self.output.dir),
                           ("judge.endpoint", self.judge.endpoint)):
            if not value:
                raise ValueError(f"{key} is required")
        self.judge.endpoint.check("judge.endpoint")
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"candidates need distinct names, got {names}")
        if self.judge.mode == "pairwise":
            if len(names) < 2:
                raise ValueError("pairwise judging needs at least two candidates")
            if self.judge.baseline is not None and self.judge.baseline not in names:
                raise ValueError(f"judge.baseline {self.judge.baseline!r} is not a candidate name {names}")


def read_answers(path: str, items: list[Item]) -> dict[str, str]:
    answers = {}
    for where, row in read_jsonl(path):
        if not isinstance(row.get("answer"), str):
            raise ValueError(f"{where}: each row needs 'id' and a string 'answer'")
        answers[str(row.get("id"))] = row["answer"]
    missing = [item.id for item in items if item.id not in answers]
    if missing:
        raise ValueError(f"{path}: no answer for ids {missing[:5]}{' …' if len(missing) > 5 else ''}")
    return answers


def collect_answers(config: JudgeConfig, candidate: Candidate, items: list[Item]) -> dict[str, str]:
    if candidate.answers:
        return read_answers(candidate.answers, items)
    groups: dict[str, list[Item]] = {}  # items offering the same tools are asked together
    for item in items:
        groups.setdefault(json.dumps(item.tools, sort_keys=True), []).append(item)
    answers = {}
    with open_endpoint(candidate.endpoint, **asdict(config.client)) as client:
        for group in groups.values():
            tools = {"tools": group[0].tools} if group[0].tools else {}
            replies = client.chat_many([item.messages for item in group], desc=f"answers: {candidate.name}",
                                       max_tokens=config.generation.max_tokens,
                                       temperature=config.generation.temperature, **tools, **candidate.request_params)
            answers.update({item.id: _answer_text(reply) for item, reply in zip(group, replies)})
    return answers


def _answer_text(reply) -> str:
    """The reply as text; calls an endpoint returned as `tool_calls` are written back in Qwen3's `<tool_call>`
    form, so the judge sees them and the function-calling check reads them."""
    if not reply.tool_calls:
        return reply.content
    calls = [{"function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
             for c in reply.tool_calls]
    return reply.content + render_tool_calls(calls, reply.content)


def check_answers(items: list[Item], answers: dict[str, dict[str, str]]) -> tuple[dict, list]:
    """Code checks per candidate: instruction following (items with constraints) and function calling (items
    with tools)."""
    results, records = {}, []
    following = [item for item in items if item.constraints]
    calling = [item for item in items if item.tools]
    for name, replies in answers.items():
        result = {}
        if following:
            met = [instruction_following.check_reply(replies[item.id], item.constraints) for item in following]
            result["instruction_following"] = instruction_following.score([i.task for i in following], met)
            records += [{"candidate": name, "id": item.id, "task": item.task, "constraints_met": row}
                        for item, row in zip(following, met)]
        if calling:
            checks = [function_calling.check_reply(replies[item.id], item.tools, item.reference_calls)
                      for item in calling]
            result["function_calling"] = function_calling.score([i.task for i in calling], checks)
            records += [{"candidate": name, "id": item.id, "task": item.task, "call_checks": row}
                        for item, row in zip(calling, checks)]
        if result:
            results[name] = result
    return results, records


def checks_markdown(checks: dict) -> str:
    if not checks:
        return ""
    rows = []
    for name, result in checks.items():
        if "instruction_following" in result:
            r = result["instruction_following"]["overall"]
            rows.append([name, "instruction following", r["prompts"], f"constraints {100 * r['constraint_accuracy']:.1f}%, "
                         f"prompts {100 * r['prompt_accuracy']:.1f}%"])
        if "function_calling" in result:
            r = result["function_calling"]["overall"]
            rows.append([name, "function calling", r["prompts"], ", ".join(
                f"{check.replace('_', ' ')} {100 * r[check]:.1f}%" for check in function_calling.CHECKS)])
    return "\n## Checked by code\n\n" + markdown_table(["Candidate", "Task kind", "Prompts", "Accuracy"], rows)


def ask_judge(client: ChatClient, settings: JudgeSettings, conversations: list[list[dict]],
              parse: Callable[[str], object]) -> tuple[list, list[list[str]]]:
    """Verdicts for every conversation; a malformed one is re-asked (with the retry reminder after the bad
    reply) up to `retries` times, then stays None. Returns the verdicts and every reply received."""
    replies: list[list[str]] = [[] for _ in conversations]

    def verdict(index: int, reply) -> object:
        replies[index].append(reply.content)
        value = parse(reply.content)
        if value is None:
            raise Malformed("no verdict in the reply")
        return value

    params = dict(max_tokens=settings.max_tokens, temperature=settings.temperature, **settings.request_params)
    answers = ask_all(client, conversations, None, verdict, retries=settings.retries,
                      retry_prompt=settings.prompts.retry, usage=Usage(), params=params, desc="judge")
    for answer, received in zip(answers, replies):
        if answer.reason == "request_failed":
            received.append(f"<request failed: {answer.detail}>")
    return [answer.value for answer in answers], replies


def judge_pairwise(config: JudgeConfig, client: ChatClient, items: list[Item], answers: dict) -> tuple[dict, list]:
    prompts = config.judge.prompts
    baseline = config.judge.baseline or config.candidates[0].name
    comparisons, records = {}, []
    for candidate in (c.name for c in config.candidates if c.name != baseline):
        conversations = []
        for item in items:
            mine, theirs = answers[candidate][item.id], answers[baseline][item.id]
            for first, second in ((mine, theirs), (theirs, mine)):
                fields = dict(question=item.question, answer_a=first, answer_b=second, reference=item.reference or "")
                conversations.append(conversation(prompts.pairwise_system, prompts.pairwise_user, fields))
        verdicts, replies = ask_judge(client, config.judge, conversations, parse_pairwise)
        outcomes = [pair_outcome(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(items))]
        comparisons[f"{candidate} vs {baseline}"] = summarize_pairwise(
            [item.task for item in items], outcomes, **asdict(config.bootstrap))
        records += [{"comparison": f"{candidate} vs {baseline}", "id": item.id, "task": item.task,
                     "verdict_candidate_first": verdicts[2 * i], "verdict_candidate_second": verdicts[2 * i + 1],
                     "outcome": outcomes[i], "judge_replies": [replies[2 * i], replies[2 * i + 1]]}
                    for i, item in enumerate(items)]
    return comparisons, records


def judge_single(config: JudgeConfig, client: ChatClient, items: list[Item], answers: dict) -> tuple[dict, list]:
    prompts = config.judge.prompts
    ratings, records = {}, []
    for candidate in (c.name for c in config.candidates):
        conversations = []
        for item in items:
            with_reference = config.judge.use_reference and item.reference is not None
            template = prompts.single_user_reference if with_reference else prompts.single_user
            fields = dict(question=item.question, answer=answers[candidate][item.id], reference=item.reference or "")
            conversations.append(conversation(prompts.single_system, template, fields))
        verdicts, replies = ask_judge(client, config.judge, conversations, parse_rating)
        ratings[candidate] = summarize_ratings([item.task for item in items], verdicts, **asdict(config.bootstrap))
        records += [{"candidate": candidate, "id": item.id, "task": item.task, "rating": verdicts[i],
                     "judge_replies": replies[i]} for i, item in enumerate(items)]
    return ratings, records


def write_report(out: Path, mode: str, results: dict, checks: dict | None = None) -> None:
    tasks = sorted({task for result in results.values() for task in result["tasks"]})
    if mode == "pairwise":
        rows = [[name, task, r["win"], r["tie"], r["loss"], r["invalid"], 100 * r["win_rate"],
                 f"{100 * r['ci'][0]:.1f}–{100 * r['ci'][1]:.1f}"]
                for name, result in results.items() for task, r in [*result["tasks"].items(),
                                                                    ("ALL", result["overall"])]]
        table = markdown_table(["Comparison", "Task", "Win", "Tie", "Loss", "Invalid", "Win rate %", "95% CI"], rows)
        value, scale, label, limits = "win_rate", 100, "win rate (%) vs baseline", (0, 100)
    else:
        rows = [[name, task, r["rated"], r["invalid"], r["mean"], f"{r['ci'][0]:.2f}–{r['ci'][1]:.2f}"]
                for name, result in results.items() for task, r in [*result["tasks"].items(),
                                                                    ("ALL", result["overall"])]]
        table = markdown_table(["Candidate", "Task", "Rated", "Invalid", "Mean rating", "95% CI"], rows)
        value, scale, label, limits = "mean", 1, "mean rating (1–10)", (0, 10)
    write_text(out / "report.md", f"# LLM-as-judge ({mode})\n\n{table}{checks_markdown(checks or {})}")
    labels = tasks + ["ALL"]
    per_label = {name: [*(result["tasks"].get(t) for t in tasks), result["overall"]] for name, result in results.items()}
    bar_chart(out / "report.png", labels,
              {name: [scale * s[value] if s else 0.0 for s in stats] for name, stats in per_label.items()},
              intervals={name: [(scale * s["ci"][0], scale * s["ci"][1]) if s else (0.0, 0.0) for s in stats]
                         for name, stats in per_label.items()},
              title=f"LLM-as-judge ({mode}) per task", ylabel=label, ylim=limits)


def run(config: JudgeConfig) -> dict:
    items = read_items(config.data.path)[:config.data.limit]
    out = Path(config.output.dir)
    answers = {}
    for candidate in config.candidates:
        answers[candidate.name] = collect_answers(config, candidate, items)
        write_jsonl(out / "answers" / f"{candidate.name}.jsonl",
                    [{"id": item.id, "task": item.task, "answer": answers[candidate.name][item.id]} for item in items])
    checks, check_records = check_answers(items, answers)
    with open_endpoint(config.judge.endpoint, **asdict(config.client)) as client:
        judge = judge_pairwise if config.judge.mode == "pairwise" else judge_single
        results, records = judge(config, client, items, answers)
    report = {"mode": config.judge.mode, "data": config.data.path, "results": results, "checks": checks,
              "config": asdict(config)}
    write_jsonl(out / "judgments.jsonl", records + check_records)
    write_json(out / "report.json", report)
    write_report(out, config.judge.mode, results, checks)
    return report


def main(argv: list[str] | None = None) -> int:
    return run_recipe(JudgeConfig, run, argv, __doc__.split("\n\n")[0], "judge.mode=single", report=print_report_md)


if __name__ == "__main__":
    sys.exit(main())
