"""recipes/eval.py end to end on a tiny checkpoint with the real Qwen3 tokenizer, checked against HF
transformers computing the same scores independently; endpoint modes against scripted replies."""
import json
import re
import subprocess
import sys

import pytest
import torch
from qwen3_fixtures import save_chat_checkpoint
from tokenizers import Tokenizer

from scripted_server import ChatServer, ScriptedBackend
from qforge.engine.config_io import load_config
from qforge.recipes.eval import EvalConfig, main, run
from qforge.recipes.evals.mcq import official_prompt, read_questions, read_subjects

DATA = "recipes/data/mcq_demo.jsonl"
LIMIT = 12  # includes the 3- and 5-option questions


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_chat_checkpoint(tmp_path_factory.mktemp("eval") / "tiny-mcq", seed=11)


@pytest.fixture(scope="module")
def oracle(checkpoint):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


@pytest.fixture(scope="module")
def questions():
    return read_questions(DATA, read_subjects())[:LIMIT]


def evaluate(checkpoint, tmp_path, mode, **extra):
    overrides = [f"model.path={checkpoint}", f"data.path={DATA}", f"data.limit={LIMIT}", f"output.dir={tmp_path}",
                 f"eval.mode={mode}", "eval.batch_size=5"] + [f"{k}={v}" for k, v in extra.items()]
    report = run(load_config(EvalConfig, "recipes/configs/eval.yaml", overrides))
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "report.json").read_text())["overall"] == report["overall"]
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.png").stat().st_size > 0
    return report, {p["id"]: p for p in predictions}


def check_against(report, predictions, questions, expected):
    assert {q: p["pred"] for q, p in predictions.items()} == expected
    correct = sum(expected[q.id] == q.answer for q in questions)
    assert report["overall"]["correct"] == correct and report["overall"]["total"] == len(questions)
    for subject in {q.subject for q in questions}:
        members = [q for q in questions if q.subject == subject]
        assert report["subjects"][subject]["correct"] == sum(expected[q.id] == q.answer for q in members)


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def oracle_prompt(hf_tokenizer, question, chat_template):
    """The prompt text as transformers renders it (the chat template from tokenizer_config.json)."""
    if not chat_template:
        return official_prompt(question)
    return hf_tokenizer.apply_chat_template([{"role": "user", "content": official_prompt(question).rstrip()}],
                                         add_generation_prompt=True, enable_thinking=False, tokenize=False)


@pytest.mark.parametrize("chat_template", [False, True])
@torch.no_grad()
def test_official_mode_matches_hf_one_greedy_token(checkpoint, tmp_path, oracle, hf_tokenizer, questions,
                                                   chat_template):
    model, tokenizer = oracle
    expected = {}
    for question in questions:
        prompt = oracle_prompt(hf_tokenizer, question, chat_template)
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids])
        token = int(model(ids, logits_to_keep=1).logits[0, -1].argmax())
        text = tokenizer.decode([token], skip_special_tokens=True).strip()
        expected[question.id] = text if text in question.letters and text else None  # else unparseable
    report, predictions = evaluate(checkpoint, tmp_path, "official", **{"eval.chat_template": chat_template})
    check_against(report, predictions, questions, expected)


@pytest.mark.parametrize("chat_template", [False, True])
@torch.no_grad()
def test_loglik_mode_matches_hf_option_likelihoods(checkpoint, tmp_path, oracle, hf_tokenizer, questions,
                                                   chat_template):
    """Oracle: log p(last token of `prompt + letter`) from a full forward of that very sequence."""
    model, tokenizer = oracle
    expected = {}
    for question in questions:
        scores, prompt = {}, oracle_prompt(hf_tokenizer, question, chat_template)
        for letter in question.letters:
            ids = tokenizer.encode(prompt + letter, add_special_tokens=False).ids
            logprobs = model(torch.tensor([ids]), logits_to_keep=2).logits[0, 0].log_softmax(-1)
            scores[letter] = float(logprobs[ids[-1]])
        expected[question.id] = max(scores, key=scores.get)
    report, predictions = evaluate(checkpoint, tmp_path, "loglik", **{"eval.chat_template": chat_template})
    check_against(report, predictions, questions, expected)
    assert all(set(p["scores"]) == set(q.letters) for q, p in zip(questions, predictions.values()))
    assert report["overall"]["no_answer"] == 0


def test_think_mode_without_closed_reasoning_counts_wrong(checkpoint, tmp_path, questions):
    report, predictions = evaluate(checkpoint, tmp_path, "think", **{"eval.max_new_tokens": 3})
    assert all(p["pred"] is None for p in predictions.values())
    assert report["overall"]["correct"] == 0 and report["overall"]["no_answer"] == len(questions)


def test_endpoint_modes_read_scripted_replies(tmp_path, questions):
    """A scripted model that thinks, then answers right on even-numbered questions, 'A' otherwise."""
    by_text = {q.question: q for q in questions}

    def reply(request):
        question = by_text[re.search(r"Câu hỏi: (.*)\n", request.messages[-1]["content"]).group(1)]
        letter = question.answer if int(question.id[-1]) % 2 == 0 else "A"
        if request.max_tokens == 1:
            return letter
        return f"<think>Xét từng lựa chọn…</think>\n\nĐáp án đúng là: {letter}"

    expected = {q.id: (q.answer if int(q.id[-1]) % 2 == 0 else "A") for q in questions}
    with ChatServer(ScriptedBackend(reply, name="scripted"), port=0) as server:
        for mode in ("official", "think"):
            overrides = [f"model.base_url={server.url}", "model.model=scripted", f"data.path={DATA}",
                         f"data.limit={LIMIT}", f"output.dir={tmp_path / mode}", f"eval.mode={mode}"]
            report = run(load_config(EvalConfig, "recipes/configs/eval_endpoint.yaml", overrides))
            predictions = {json.loads(line)["id"]: json.loads(line)
                           for line in (tmp_path / mode / "predictions.jsonl").read_text().splitlines()}
            check_against(report, predictions, questions, expected)


@pytest.mark.parametrize("mode", ["official", "think"])
def test_answers_that_are_not_a_choice_letter_count_as_unparseable(tmp_path, questions, mode):
    """A model answering with digits (the demo model on MCQ) scores 0 and every answer is unparseable, in
    every mode; 'B' on the last question is read."""
    last = questions[-1]

    def reply(request):
        letter = "B" if last.question in request.messages[-1]["content"] else "2"
        return letter if request.max_tokens == 1 else f"<think>…</think>\n\nĐáp án đúng là: {letter}"

    with ChatServer(ScriptedBackend(reply, name="scripted"), port=0) as server:
        overrides = [f"model.base_url={server.url}", "model.model=scripted", f"data.path={DATA}",
                     f"data.limit={LIMIT}", f"output.dir={tmp_path}", f"eval.mode={mode}"]
        report = run(load_config(EvalConfig, "recipes/configs/eval_endpoint.yaml", overrides))
    assert report["unparseable"] == LIMIT - 1 and report["unfinished"] == 0
    assert report["overall"]["no_answer"] == LIMIT - 1
    assert report["overall"]["correct"] == int(last.answer == "B")
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["pred"] for p in predictions] == [None] * (LIMIT - 1) + ["B"]


def test_cli_writes_outputs_and_rejects_unknown_keys(checkpoint, tmp_path, capsys):
    command = [sys.executable, "recipes/eval.py", "--config", "recipes/configs/eval.yaml", f"model.path={checkpoint}",
               f"output.dir={tmp_path}", "data.limit=4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout and (tmp_path / "report.json").exists()
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 4
    assert main(command[2:] + ["eval.mdoe=loglik"]) == 2  # a config error: one line, exit code 2
    assert "command line: unknown key 'eval.mdoe'; did you mean 'eval.mode'?" in capsys.readouterr().err


def test_exact_match_helper_compares_extracted_answers(checkpoint):
    from qforge.engine import load_model
    from qforge.engine.serve.chat import ChatModel
    from qforge.engine.data import ChatTemplate
    from qforge.recipes.evals.exact_match import exact_match
    from qforge.engine.generate import generate

    template = ChatTemplate.from_pretrained(checkpoint)
    model = load_model(checkpoint, dtype=torch.float32)
    questions = ["Lan có 3 quả cam, mẹ cho thêm 2 quả. Hỏi Lan có mấy quả?", "7 × 8 = ?", "Tính 45 : 5.", "10 - 4 = ?"]
    prompts = [template.tokenizer.encode(template.render([{"role": "user", "content": q}], add_generation_prompt=True), add_special_tokens=False).ids for q in questions]
    texts = [template.tokenizer.decode(ids, skip_special_tokens=True)
             for ids in generate(model, prompts, max_new_tokens=4, stop_ids=[template.im_end_id])]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Đáp án: 1"}],
             "answer": texts[i][:2] if i % 2 == 0 else "not this"} for i, q in enumerate(questions)]
    result = exact_match(ChatModel(model, template), rows, extract=lambda text: text[:2], max_new_tokens=4)
    assert (result.correct, result.total, result.accuracy) == (2, 4, 0.5)
    assert [p["text"] for p in result.predictions] == texts
