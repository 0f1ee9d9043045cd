"""Distillation: the stored teacher top-k and the student's KL losses against transformers + fp64 closed forms,
and both recipes end to end with exact resume."""
import contextlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from qwen3_fixtures import save_chat_checkpoint
from tiny_run import few_rows, tiny_overrides, tiny_run_files  # noqa: F401 (fixtures)
from transformers import AutoModelForCausalLM

from qforge.engine import load_model
from qforge.engine.config_io import load_config
from qforge.engine.data import ChatTemplate
from qforge.engine.train.build import build_vocab
from qforge.engine.train.distill import OffPolicyDistill, OnPolicyDistill
from qforge.engine.train.parallel import Dist
from qforge.recipes.distill import DistillConfig, main as distill_main


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_chat_checkpoint(tmp_path_factory.mktemp("distill") / "teacher", seed=5)



def _config(files, out, teacher, **extra):
    settings = {"distill.teacher": str(teacher), "distill.top_k": 8, "data.max_tokens": 768,
                "train.max_steps": 4, "optim.warmup_steps": 0, **extra}
    return load_config(DistillConfig, None, tiny_overrides(files, out, **settings))


def _hf_logprobs(checkpoint, packed):
    """log-softmax of an HF model's logits on each packed sequence, fp64 (the oracle never sees qforge code)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)
    bounds = packed.cu_seqlens.tolist()
    with torch.no_grad():
        return torch.cat([model(packed.input_ids[a:b][None]).logits[0].log_softmax(-1)
                          for a, b in zip(bounds[:-1], bounds[1:])])


def test_off_policy_targets_and_loss_match_transformers(few_rows, teacher, tmp_path):
    config = _config(few_rows, tmp_path / "out", teacher, **{"distill.ce_weight": 0.25})
    template = ChatTemplate.from_pretrained(teacher)
    objective = OffPolicyDistill(str(teacher), top_k=8, ce_weight=0.25)
    datasets, _, _ = objective.load_data(config, template, Dist())
    batch = objective.pack(datasets[0][:3], 768, seed=0)[0]
    rows = (batch.labels != -100).nonzero().squeeze(1)

    teacher_logp = _hf_logprobs(teacher, batch.packed)[rows]
    top = teacher_logp.topk(8)
    assert torch.equal(batch.target_ids[rows], top.indices)
    torch.testing.assert_close(batch.target_logprobs[rows].double(), top.values, atol=2e-5, rtol=0)
    assert (batch.target_ids[batch.labels == -100] == -1).all()

    student_dir = tmp_path / "student"
    student = load_model(save_chat_checkpoint(student_dir, seed=6), dtype=torch.float32)
    vocab = build_vocab(config.vocab, datasets, template, student.config.vocab_size)
    objective.prepare(student, config, vocab, Dist(), contextlib.nullcontext)
    vocab_index, target_index = vocab.loss_tables(torch.device("cpu"))
    loss = student.distill_loss(batch, vocab_index=vocab_index, target_index=target_index)

    # fp64 closed form over the kept vocabulary: forward KL to the renormalised kept top-k, mixed with CE
    logp = _hf_logprobs(student_dir, batch.packed)[rows][:, vocab_index].log_softmax(-1)
    position = {int(v): i for i, v in enumerate(vocab_index)}
    expected = 0.0
    for r, t in enumerate(rows.tolist()):
        kept = [(position[int(i)], float(lp)) for i, lp in zip(batch.target_ids[t], batch.target_logprobs[t])
                if int(i) in position]
        logq = torch.tensor([lp for _, lp in kept], dtype=torch.float64)
        logq = logq - logq.logsumexp(0)
        kl = sum(q * (lq - logp[r, j]) for (j, _), q, lq in zip(kept, logq.exp(), logq))
        expected += 0.75 * kl - 0.25 * logp[r, position[int(batch.labels[t])]]
    assert abs(loss.item() - float(expected)) < 1e-4 * max(1.0, abs(float(expected)))


def test_on_policy_samples_and_reverse_kl_match_transformers(few_rows, teacher, tmp_path):
    config = _config(few_rows, tmp_path / "out", teacher, **{"distill.mode": "on_policy"})
    template = ChatTemplate.from_pretrained(teacher)
    objective = OnPolicyDistill(str(teacher), max_new_tokens=12, temperature=1.0)
    datasets, _, _ = objective.load_data(config, template, Dist())
    student_dir = save_chat_checkpoint(tmp_path / "student", seed=7)
    student = load_model(student_dir, dtype=torch.float32)
    vocab = build_vocab(config.vocab, datasets, template, student.config.vocab_size)
    objective.prepare(student, config, vocab, Dist(), contextlib.nullcontext)
    vocab_index, target_index = vocab.loss_tables(torch.device("cpu"))
    prompts = objective.pack(datasets[0][:4], 4096, seed=0)[0]
    sampled = objective.sample(student, prompts, torch.device("cpu"), greedy=False)
    rows = (sampled.labels != -100).nonzero().squeeze(1)
    completion = sampled.labels[rows]
    assert torch.isin(completion, vocab_index).all()  # the student samples only kept tokens
    starts = sampled.cu_seqlens[:-1].long()
    for prompt, start in zip(prompts.prompts, starts.tolist()):  # every sequence is its prompt + a sample
        assert sampled.input_ids[start:start + len(prompt.prompt_ids)].tolist() == prompt.prompt_ids.tolist()

    loss = student.distill_loss(sampled, vocab_index=vocab_index, target_index=target_index)
    log_ps = _hf_logprobs(student_dir, sampled)[rows][:, vocab_index].log_softmax(-1)
    log_pt = _hf_logprobs(teacher, sampled)[rows][:, vocab_index].log_softmax(-1)
    expected = (log_ps.exp() * (log_ps - log_pt)).sum()
    assert abs(loss.item() - expected.item()) < 1e-4 * max(1.0, expected.item())


def test_an_off_policy_step_is_the_same_however_it_is_split_and_a_filler_adds_nothing(few_rows, teacher, tmp_path):
    """train.batch_size deals a step's micro-batches to the ranks and evens them out with fillers: one
    micro-batch of four sequences == one per sequence plus a filler (loss and every gradient)."""
    config = _config(few_rows, tmp_path / "out", teacher, **{"distill.ce_weight": 0.25})
    objective = OffPolicyDistill(str(teacher), top_k=8, ce_weight=0.25)
    items = objective.load_data(config, ChatTemplate.from_pretrained(teacher), Dist())[0][0][:4]
    student_dir = save_chat_checkpoint(tmp_path / "student", seed=6)
    split = list(objective.pack(items, max(len(i) for i in items), seed=0))
    filler = objective.filler(items[0], 768)
    assert len(split) == 4 and filler.num_loss_tokens == 0 and filler.num_tokens == len(items[0])
    results = []
    for batches in (list(objective.pack(items, 4096, seed=0)), split[:2] + [filler] + split[2:]):
        student = load_model(student_dir, dtype=torch.float32)
        objective.prepare(student, config, None, Dist(), contextlib.nullcontext)
        step = objective.train_step(student, batches, Dist(), None, contextlib.nullcontext)
        results.append((step.loss_sum / step.weight, [p.grad.clone() for p in student.parameters()]))
    (one, one_grads), (split_loss, split_grads) = results
    assert split_loss == pytest.approx(one, rel=1e-6) and one > 0
    for a, b in zip(one_grads, split_grads):
        torch.testing.assert_close(b, a, atol=1e-6 * a.abs().max().item(), rtol=0)


def test_teacher_scoring_shows_a_progress_bar_with_its_total(few_rows, teacher, tmp_path, capsys):
    """Scoring a large set takes minutes: the main rank shows a bar with a total (so an ETA), unless
    output.progress=false."""
    template = ChatTemplate.from_pretrained(teacher)
    for progress in (False, True):
        config = _config(few_rows, tmp_path / f"out-{progress}", teacher, **{"output.progress": progress})
        OffPolicyDistill(str(teacher), top_k=8).load_data(config, template, Dist())
        err = capsys.readouterr().err
        assert ("teacher top-k" in err) == progress, err
    assert re.search(r"teacher top-k: 100%\|[^|]*\| (\d+)/\1 \[", err), err


def test_the_teacher_is_loaded_once_for_the_train_and_eval_stores(tiny_run_files, few_rows, teacher, tmp_path,
                                                                   monkeypatch):
    import qforge.engine.train.distill as distill

    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(Path(tiny_run_files["train"]).read_text(encoding="utf-8").splitlines(True)[6:8]),
                        encoding="utf-8")
    loads = []
    monkeypatch.setattr(distill, "load_teacher", lambda *a, **k: loads.append(a) or load_model(
        str(teacher), dtype=torch.float32))
    config = _config(few_rows, tmp_path / "out", teacher, **{"data.eval": f"[{held_out}]"})
    objective = OffPolicyDistill(str(teacher), top_k=8)
    datasets, held, _ = objective.load_data(config, ChatTemplate.from_pretrained(teacher), Dist())
    assert len(loads) == 1 and len(datasets[0]) == 6 and len(held) == 2 and objective._teacher is None
    assert len(list((tmp_path / "out/teacher").iterdir())) == 2  # two stores, one teacher load


def _losses(out: Path):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["off_policy", "on_policy", "off_policy_batch_size"])
def test_recipe_runs_and_resumes_exactly(few_rows, teacher, tmp_path, mode):
    steps = {"train.batch_size": 2} if mode == "off_policy_batch_size" else {}

    def run(out, **extra):
        settings = {"distill.teacher": str(teacher), "distill.mode": mode.removesuffix("_batch_size"), "distill.top_k": 8,
                    "distill.max_new_tokens": 8, "data.max_tokens": 400, "train.max_steps": 3,
                    "train.save_every": 2, "distill.teacher_dir": str(tmp_path / "teacher"), **steps, **extra}
        (tmp_path / "empty.yaml").write_text("{}")
        return distill_main(["--config", str(tmp_path / "empty.yaml")] + tiny_overrides(few_rows, out,
                                                                                         **settings))

    assert run(tmp_path / "full") == 0
    full = _losses(tmp_path / "full")
    assert len(full) == 3 and all(loss > 0 for loss in full)
    assert (tmp_path / "full/final/model.safetensors").is_file()
    assert run(tmp_path / "resumed", **{"train.resume": str(tmp_path / "full/checkpoints/step-2")}) == 0
    assert _losses(tmp_path / "resumed") == full[2:]


def test_a_teacher_with_another_vocabulary_is_a_config_error_before_anything_runs(few_rows, tmp_path, capsys):
    from qwen3_fixtures import save_hf_qwen3

    other = save_hf_qwen3(tmp_path / "small")  # vocabulary 512: another tokenizer
    (tmp_path / "empty.yaml").write_text("{}")
    for mode in ("off_policy", "on_policy"):
        out = tmp_path / mode
        code = distill_main(["--config", str(tmp_path / "empty.yaml")] + tiny_overrides(few_rows, out, **{
            "distill.teacher": str(other), "distill.mode": mode}))
        assert code == 2 and not out.exists()
        assert f"distill.teacher={other}: vocabulary size 512 differs from the student's 151936" in capsys.readouterr().err


def test_a_damaged_teacher_store_says_how_to_rebuild_it(few_rows, teacher, tmp_path):
    from qforge.engine.errors import DataError

    config = _config(few_rows, tmp_path / "out", teacher)
    template = ChatTemplate.from_pretrained(teacher)
    OffPolicyDistill(str(teacher), top_k=8).load_data(config, template, Dist())
    (store,) = (tmp_path / "out/teacher").iterdir()
    (store / "logprobs.npy").unlink()
    with pytest.raises(DataError, match=rf"teacher store {store} is damaged \(logprobs.npy is missing\); delete that "
                                        rf"directory and rerun: the teacher scores the data again"):
        OffPolicyDistill(str(teacher), top_k=8).load_data(config, template, Dist())
    np.save(store / "logprobs.npy", np.zeros((3, 8), np.float32))  # cut short: fewer rows than the ids
    with pytest.raises(DataError, match=r"is damaged \(its arrays do not match"):
        OffPolicyDistill(str(teacher), top_k=8).load_data(config, template, Dist())
