"""Existing reasoning traces: reading any SFT file, trace filters, verification through the verifier registry,
preference pairs from passing and failing samples of one question, and the per-stage report.

A trace row is any chat row whose last message is the assistant's (reasoning in `reasoning_content` or an
inline <think> block) with what its verifier needs: `verifier` (a recipes.verifiers name; else the config's
default) and `reference` (the verifier's dict), or synthesis's `reference_answer` (+ `answer_check`).
Optional: `question_id` (samples of one question share it; default: the prompt messages), `source` (for pass
rates per source; default: the file name).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from itertools import product
from pathlib import Path

from qforge.engine.thinking import join_think, message_think
from qforge.recipes.common.files import read_jsonl
from qforge.recipes.verifiers import Verdict, get_verifier, verify_batch


def reference_of(check: str, reference_answer: str) -> dict:
    """A verifier's reference dict from synthesis's `reference_answer` string and `answer_check` name."""
    if check == "constraints":
        return {"constraints": json.loads(reference_answer)}
    if check == "tool_call":
        return json.loads(reference_answer)
    if check == "code":
        return {"tests": json.loads(reference_answer)}
    return {"answer": reference_answer}


def read_traces(path: str, default_verifier: str | None, limit: int | None = None) -> list[dict]:
    """Trace rows as {id, question_id, source, prompt, reasoning, answer, verifier, reference}."""
    rows = []
    for where, row in list(read_jsonl(path))[:limit]:
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
            raise ValueError(f"{where}: 'messages' must end with an assistant message (the trace)")
        verifier = row.get("verifier") or row.get("answer_check") or default_verifier
        if verifier is None:
            raise ValueError(f"{where}: no 'verifier' on the row and no traces.verifier default")
        try:
            get_verifier(verifier)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if isinstance(row.get("reference"), dict):
            reference = row["reference"]
        elif row.get("reference_answer") is not None:
            reference = reference_of(verifier, str(row["reference_answer"]))
        else:
            raise ValueError(f"{where}: needs 'reference' (the {verifier} verifier's dict) or 'reference_answer'")
        reasoning, answer = message_think(messages[-1])
        prompt = messages[:-1]
        question_id = row.get("question_id") or hashlib.sha256(
            json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
        rows.append({"id": str(row.get("id", where)), "question_id": str(question_id),
                     "source": str(row.get("source") or Path(path).name), "prompt": prompt,
                     "reasoning": reasoning, "answer": answer, "verifier": verifier, "reference": reference})
    return rows


def completion(row: dict) -> str:
    """What a verifier reads: the think block and the answer, as the model would write them."""
    return join_think(row["reasoning"], row["answer"])


def assistant_message(row: dict) -> dict:
    return {"role": "assistant", "content": row["answer"], "reasoning_content": row["reasoning"]}


def repetition_ratio(text: str, n: int) -> float:
    """The share of word n-grams that repeat an earlier one (0: none; near 1: a loop)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class TraceLength:
    """Trace length in tokens of `tokenizer` (a local tokenizer path), or in whitespace-separated words."""

    def __init__(self, tokenizer: str | None):
        self.tokenizer = None
        if tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def verify_rows(rows: list[dict], workers: int, desc: str = "verify") -> list[Verdict]:
    """Every row's completion against its reference (recipes.verifiers.verify_batch)."""
    return verify_batch([(r["verifier"], completion(r), r["reference"]) for r in rows], workers, desc)


def pair_up(rows: list[dict], per_question: int, questions=()) -> tuple[list[tuple[int, dict, dict]], dict]:
    """(index within its question, passing sample, failing sample) of the same question: up to `per_question`
    per question, walking the chosen and rejected samples round-robin so each is reused as little as possible.
    Also returns which questions (those of `rows`, plus `questions`) had no passing or no failing sample."""
    groups: dict[str, list[dict]] = {question_id: [] for question_id in questions}
    for row in rows:
        groups.setdefault(row["question_id"], []).append(row)
    matched, no_pass, no_fail = [], [], []
    for question_id, group in groups.items():
        chosen = [r for r in group if r["verdict"]["passed"]]
        rejected = [r for r in group if not r["verdict"]["passed"]]
        if not chosen:
            no_pass.append(question_id)
        if not rejected:
            no_fail.append(question_id)
        order = sorted(product(range(len(chosen)), range(len(rejected))),
                       key=lambda ij: ((ij[1] - ij[0]) % len(rejected), ij[0]))  # diagonals: spread the reuse
        matched += [(k, chosen[i], rejected[j]) for k, (i, j) in enumerate(order[:per_question])]
    summary = {"questions": len(groups), "questions_without_passing_sample": sorted(no_pass),
               "questions_without_failing_sample": sorted(no_fail)}
    return matched, summary


def pair_row(index: int, good: dict, bad: dict) -> dict:
    """One pair in recipes/dpo.py's `messages` + `chosen` + `rejected` layout, both sides with their reasoning
    (a failing row whose rewrite also failed is rejected in its rewritten form: the same format as the chosen
    side, so the pair differs in correctness rather than in formatting)."""
    shown = bad.get("rewrite", bad)
    return {"id": f"{good['question_id']}-p{index}", "question_id": good["question_id"], "messages": good["prompt"],
            "chosen": assistant_message(good), "rejected": assistant_message(shown),
            "task": good.get("task", good["verifier"]), "verifier": good["verifier"], "chosen_id": good["id"],
            "rejected_id": bad["id"], "rejected_status": shown["verdict"]["status"]}


def pair_counts(pairs: list[dict]) -> dict:
    """{task: {verifier: pairs}}."""
    counts: dict = defaultdict(Counter)
    for pair in pairs:
        counts[pair["task"]][pair["verifier"]] += 1
    return {task: dict(sorted(by_verifier.items())) for task, by_verifier in sorted(counts.items())}


def make_pairs(rows: list[dict], per_question: int) -> tuple[list[dict], dict]:
    """Pairs of a passing (chosen) and a failing (rejected) sample of the same question (pair_up, pair_row),
    and the summary: pair counts per task and verifier, questions with no passing or no failing sample."""
    matched, summary = pair_up(rows, per_question)
    pairs = [pair_row(k, good, bad) for k, good, bad in matched]
    return pairs, {"pairs": len(pairs), "per_task": pair_counts(pairs), **summary}


def pass_rates(rows: list[dict]) -> dict:
    """{source: {verifier: {"samples", "passed", "pass_rate", "statuses"}}} over verified rows."""
    table: dict = defaultdict(lambda: defaultdict(lambda: {"samples": 0, "passed": 0, "statuses": Counter()}))
    for row in rows:
        cell = table[row["source"]][row["verifier"]]
        cell["samples"] += 1
        cell["passed"] += row["verdict"]["passed"]
        cell["statuses"][row["verdict"]["status"]] += 1
    return {source: {verifier: {**cell, "pass_rate": cell["passed"] / cell["samples"],
                                "statuses": dict(sorted(cell["statuses"].items()))}
                     for verifier, cell in sorted(by_verifier.items())}
            for source, by_verifier in sorted(table.items())}


def verdict_dict(verdict: Verdict) -> dict:
    return {"passed": verdict.passed, "score": verdict.score, "status": verdict.status, "detail": verdict.detail}


def traces_markdown(report: dict) -> str:
    lines = ["# Reasoning data report", "", "## Stages", "", "| stage | rows in | rows out | dropped by reason |",
             "|---|---|---|---|"]
    for stage in report["stages"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in stage["dropped"].items()) or "-"
        lines.append(f"| {stage['stage']} | {stage['rows_in']} | {stage['rows_out']} | {reasons} |")
    reformat = report.get("reformat")
    if reformat:
        lines += ["", "## Reformat", "", f"- rewritten and verified: {reformat['rewritten']}",
                  f"- rewrite failed its verifier, original kept: {reformat['kept_original']}",
                  f"- rewrite failed its verifier, row dropped: {reformat['dropped']}",
                  f"- no usable rewrite (request failed or malformed), original kept: {reformat['no_rewrite']}",
                  f"- no reasoning to rewrite, row passed on as it is: {reformat['no_trace']}",
                  "- verdicts of the rewrites: " + ", ".join(f"{k}: {v}"
                                                             for k, v in reformat["rewrite_statuses"].items()),
                  f"- mean trace length ({report['length_unit']}): {reformat['mean_trace_length_before']:.1f} before, "
                  f"{reformat['mean_trace_length_after']:.1f} after"]
    lines += ["", "## Pass rate per source and verifier", "", "| source | verifier | samples | passed | pass rate "
              "| statuses |", "|---|---|---|---|---|---|"]
    for source, by_verifier in report["pass_rates"].items():
        for verifier, cell in by_verifier.items():
            statuses = ", ".join(f"{k}: {v}" for k, v in cell["statuses"].items())
            lines.append(f"| {source} | {verifier} | {cell['samples']} | {cell['passed']} | "
                         f"{cell['pass_rate']:.2f} | {statuses} |")
    lines += pairs_markdown(report["pairs"]) + [
        f"Verification: {report['verification']['programs']} completions in "
        f"{report['verification']['seconds']:.1f} s ({report['verification']['per_second']:.2f}/s, "
        f"{report['verification']['workers']} workers).", ""]
    return "\n".join(lines)


def pairs_markdown(pairs: dict) -> list[str]:
    """The report's pair section (traces and synthesis modes)."""
    lines = ["", "## Preference pairs", "", f"{pairs['pairs']} pairs from {pairs['questions']} questions "
             f"(at most {pairs['per_question']} per question).", ""]
    lines += [f"- {task} / {verifier}: {n}" for task, by_verifier in pairs["per_task"].items()
              for verifier, n in by_verifier.items()]
    rejected = pairs.get("rejected_reasoning")
    if rejected:
        lines.append(f"- rejected samples given reasoning (stage rejected_reasoning): {rejected['asked']}, usable "
                     f"{rejected['usable']}" + "".join(f", {k}: {v}" for k, v in rejected["unusable"].items())
                     + f"; pairs lost with them: {pairs['pairs_lost']}")
    lines += [f"- questions with no passing sample ({len(pairs['questions_without_passing_sample'])}): "
              f"{', '.join(pairs['questions_without_passing_sample']) or '-'}",
              f"- questions with no failing sample ({len(pairs['questions_without_failing_sample'])}): "
              f"{', '.join(pairs['questions_without_failing_sample']) or '-'}", ""]
    return lines
