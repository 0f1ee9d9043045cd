"""lm-evaluation-harness against the server (`local-completions`, `local-chat-completions`) on the task files
in lm_eval_tasks/, checked against HF transformers (log-likelihoods) and offline greedy decoding."""
import os
from pathlib import Path

import pytest
import torch
from serve_fixtures import served_checkpoint

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow
TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with served_checkpoint(tmp_path_factory.mktemp("lm-eval"), max_batch=8) as value:
        yield value


def evaluate(monkeypatch, model: str, model_args: dict, task: str, **options) -> dict:
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(TASKS)  # the task YAMLs name their data files relative to this folder
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], log_samples=True,
                                   task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                                   **options)


def test_loglikelihood_multiple_choice_with_local_completions(served, monkeypatch):
    from transformers import Qwen3ForCausalLM

    checkpoint, chat_model, server = served
    results = evaluate(monkeypatch, "local-completions",
                       {"base_url": f"{server.url}/completions", "model": chat_model.name,
                        "tokenizer": str(checkpoint), "tokenizer_backend": "huggingface", "num_concurrent": 4,
                        "max_retries": 1, "batch_size": 2}, "qforge_mc")
    hf = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    samples = results["samples"]["qforge_mc"]
    assert len(samples) == 6
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        context = chat_model.encode(f"Câu hỏi: {doc['question']}\nĐáp án:")
        expected = []
        for choice in doc["choices"]:
            whole = chat_model.encode(f"Câu hỏi: {doc['question']}\nĐáp án: {choice}")
            assert whole[:len(context)] == context
            with torch.no_grad():
                logprobs = hf(torch.tensor([whole])).logits[0].log_softmax(-1)
            expected.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        served_scores = [response[0][0] for response in sample["resps"]]
        assert served_scores == pytest.approx(expected, abs=1e-3)
        correct += max(range(len(expected)), key=expected.__getitem__) == doc["answer"]
    assert results["results"]["qforge_mc"]["acc,none"] == pytest.approx(correct / 6)


def test_generation_with_stop_sequences_with_local_completions(served, monkeypatch):
    checkpoint, chat_model, server = served
    results = evaluate(monkeypatch, "local-completions",
                       {"base_url": f"{server.url}/completions", "model": chat_model.name,
                        "tokenizer": str(checkpoint), "tokenizer_backend": "huggingface", "num_concurrent": 2,
                        "max_retries": 1}, "qforge_gen")
    samples = results["samples"]["qforge_gen"]
    prompts = [s["doc"]["prompt"] for s in samples]
    offline = chat_model.complete(prompts, max_new_tokens=12, stop=["\n", "."])
    assert [s["resps"][0][0] for s in samples] == [c.text for c in offline]
    assert "exact_match,none" in results["results"]["qforge_gen"]


def test_generation_with_local_chat_completions(served, monkeypatch):
    _, chat_model, server = served
    results = evaluate(monkeypatch, "local-chat-completions",
                       {"base_url": f"{server.url}/chat/completions", "model": chat_model.name,
                        "num_concurrent": 2, "max_retries": 1}, "qforge_gen", apply_chat_template=True)
    samples = results["samples"]["qforge_gen"]
    conversations = [[{"role": "user", "content": s["doc"]["prompt"]}] for s in samples]
    offline = chat_model.chat(conversations, max_new_tokens=12, stop=["\n", "."])
    assert [s["resps"][0][0] for s in samples] == [c.text.strip() for c in offline]
