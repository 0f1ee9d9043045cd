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
from qforge.recipes.files import read_jsonl
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


def make_pairs(rows: list[dict], per_question: int) -> tuple[list[dict], dict]:
    """Pairs of a passing (chosen) and a failing (rejected) sample of the same question, both with their
    reasoning, in recipes/dpo.py's `messages` + `chosen` + `rejected` layout (a failing row whose rewrite also
    failed is rejected in its rewritten form: the same format as the chosen side, so the pair differs in
    correctness rather than in formatting). Up to `per_question` pairs per
    question, walking the chosen and rejected samples round-robin so each is reused as little as possible.
    Also returns which questions had no passing or no failing sample."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["question_id"]].append(row)
    pairs, no_pass, no_fail = [], [], []
    for question_id, group in groups.items():
        chosen = [r for r in group if r["verdict"]["passed"]]
        rejected = [r for r in group if not r["verdict"]["passed"]]
        if not chosen:
            no_pass.append(question_id)
        if not rejected:
            no_fail.append(question_id)
        order = sorted(product(range(len(chosen)), range(len(rejected))),
                       key=lambda ij: ((ij[1] - ij[0]) % len(rejected), ij[0]))  # diagonals: spread the reuse
        for k, (i, j) in enumerate(order[:per_question]):
            good, bad = chosen[i], rejected[j].get("rewrite", rejected[j])
            pairs.append({"id": f"{question_id}-p{k}", "question_id": question_id, "messages": good["prompt"],
                          "chosen": assistant_message(good), "rejected": assistant_message(bad),
                          "verifier": good["verifier"], "chosen_id": good["id"], "rejected_id": rejected[j]["id"],
                          "rejected_status": bad["verdict"]["status"]})
    summary = {"pairs": len(pairs), "questions": len(groups), "questions_without_passing_sample": sorted(no_pass),
               "questions_without_failing_sample": sorted(no_fail)}
    return pairs, summary


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
    pairs = report["pairs"]
    lines += ["", "## Preference pairs", "", f"{pairs['pairs']} pairs from {pairs['questions']} questions "
              f"(at most {pairs['per_question']} per question).", "",
              f"- questions with no passing sample ({len(pairs['questions_without_passing_sample'])}): "
              f"{', '.join(pairs['questions_without_passing_sample']) or '-'}",
              f"- questions with no failing sample ({len(pairs['questions_without_failing_sample'])}): "
              f"{', '.join(pairs['questions_without_failing_sample']) or '-'}", "",
              f"Verification: {report['verification']['programs']} completions in "
              f"{report['verification']['seconds']:.1f} s ({report['verification']['per_second']:.2f}/s, "
              f"{report['verification']['workers']} workers).", ""]
    return "\n".join(lines)

