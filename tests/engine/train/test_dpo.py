"""DPO: preference rows, parity of loss and gradients with TRL's DPOTrainer, the recipe end to end (cached
reference, live reference, exact resume)."""
import contextlib
import json
import re
from pathlib import Path

import pytest
import torch
from qwen3_fixtures import save_chat_checkpoint
from tiny_run import tiny_run_files  # noqa: F401 (fixture)

from qforge.engine import load_model
from qforge.engine.config_io import load_config
from qforge.engine.data import ChatTemplate, DataError
from qforge.engine.data.preference import load_pairs, pack_pairs, row_to_pair
from qforge.engine.model import hf_key
from qforge.engine.train.dpo import DPO
from qforge.engine.train.parallel import Dist
from qforge.recipes.dpo import DPOConfig, main as dpo_main

PROMPT = [{"role": "system", "content": "Trả lời ngắn gọn."}, {"role": "user", "content": "2 + 3 bằng mấy?"}]
ROWS = [
    {"messages": PROMPT, "chosen": "Đáp án: 5", "rejected": "Đáp án: 6"},
    {"prompt": [{"role": "user", "content": "Thủ đô của Việt Nam?"}],
     "chosen": [{"role": "assistant", "content": "Hà Nội.", "reasoning_content": "Thủ đô là Hà Nội."}],
     "rejected": [{"role": "assistant", "content": "Thành phố Hồ Chí Minh, thành phố lớn nhất."}]},
    {"chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
     "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}]},
    {"input": {"messages": [{"role": "user", "content": "7 × 8 = ?"}]},
     "preferred_output": [{"role": "assistant", "content": "56"}],
     "non_preferred_output": [{"role": "assistant", "content": "54, chắc vậy"}]},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_chat_checkpoint(tmp_path_factory.mktemp("dpo") / "model", seed=3)


def write_rows(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_layouts_normalise_to_the_same_conversations():
    chosen, rejected = row_to_pair(ROWS[0])
    assert chosen == PROMPT + [{"role": "assistant", "content": "Đáp án: 5"}]
    assert rejected[-1]["content"] == "Đáp án: 6"
    implicit = row_to_pair(ROWS[2])
    assert implicit[0][:-1] == implicit[1][:-1] == [{"role": "user", "content": "Say hi"}]
    openai = row_to_pair(ROWS[3])
    assert openai[0][-1]["content"] == "56" and openai[1][0]["content"] == "7 × 8 = ?"


def test_bad_rows_name_file_line_and_field(tmp_path, qwen_tokenizer_dir):
    template = ChatTemplate.from_pretrained(qwen_tokenizer_dir)
    path = write_rows(tmp_path / "bad.jsonl", [ROWS[0], {"messages": PROMPT, "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: rejected: chosen and rejected replies are identical"):
        load_pairs([path], template)
    pairs, summary = load_pairs([path], template, on_error="skip")
    assert len(pairs) == 1 and summary.skipped[0].line == 2


@pytest.mark.parametrize("empty_think", ["mask", "train"])
def test_dpo_follows_data_empty_think(tmp_path, qwen_tokenizer_dir, empty_think):
    """A plain pair rendered with thinking on: its replies' empty <think></think> block is left out of their
    log-probabilities under data.empty_think=mask (the default, as in SFT), kept under "train"."""
    path = write_rows(tmp_path / "pairs.jsonl", [ROWS[0]])
    config = load_config(DPOConfig, None, [f"model.path={qwen_tokenizer_dir}", f"data.train=[{path}]",
                                           f"output.dir={tmp_path / 'out'}", f"data.empty_think={empty_think}"])
    template = ChatTemplate.from_pretrained(qwen_tokenizer_dir)
    pair = DPO().load_data(config, template, Dist())[0][0][0]
    think = "<think>\n\n</think>\n\n" if empty_think == "train" else ""
    for example, reply in ((pair.chosen, "Đáp án: 5"), (pair.rejected, "Đáp án: 6")):
        supervised = example.input_ids[example.labels != -100].tolist()
        assert template.tokenizer.decode(supervised, skip_special_tokens=False) == f"{think}{reply}<|im_end|>"


def _trl_loss_and_grads(checkpoint, rows, beta, alphas, reference=None):
    """The oracle, independent of qforge: TRL's DPOTrainer tokenises the pairs with the HF tokenizer's chat
    template and computes its sigmoid (+ sft) loss with a reference model (a copy of the policy, or the
    `reference` checkpoint); one batch, fp32. Returns {α: (loss, gradients, TRL's logged metrics)}, features."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ref_model = None if reference is None else AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    conversations = [row_to_pair(r) for r in rows]
    dataset = Dataset.from_list([{"prompt": c[:-1], "chosen": c[-1:], "rejected": r[-1:]} for c, r in conversations])
    args = TRLConfig(output_dir=str(checkpoint.parent / "trl"), beta=beta, report_to=[], use_cpu=True,
                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.0], per_device_train_batch_size=len(rows),
                     bf16=False, fp16=False, dataset_num_proc=None)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    features = [trainer.train_dataset[i] for i in range(len(rows))]
    # TRL's completion ends with the "\n" after <|im_end|>, which qforge's SFT label rules leave unsupervised (the
    # test checks that this is the only difference); the loss is compared on the same supervised tokens
    trimmed = [{**f, "chosen_ids": f["chosen_ids"][:-1], "rejected_ids": f["rejected_ids"][:-1]} for f in features]
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(trimmed)
    model.train()
    results = {}
    for alpha in alphas:
        trainer.loss_weights = [1.0, alpha]
        trainer._metrics["train"].clear()
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
        results[alpha] = loss.item(), grads, metrics
    return results, features


def _assert_close_to_trl(model, loss, trl_loss, trl_grads):
    assert abs(loss - trl_loss) < 1e-5 * max(1.0, abs(trl_loss)), (loss, trl_loss)
    for name, param in model.named_parameters():
        theirs = trl_grads[hf_key(name)]
        assert (param.grad - theirs).abs().max() <= 1e-5 * max(1.0, theirs.abs().max().item()), name


@pytest.mark.slow
def test_loss_and_gradients_equal_trl(checkpoint, tmp_path, qwen_tokenizer_dir):
    beta, alpha = 0.3, 0.7
    results, trl_features = _trl_loss_and_grads(checkpoint, ROWS, beta, [alpha])
    trl_loss, trl_grads, _ = results[alpha]

    path = write_rows(tmp_path / "pairs.jsonl", ROWS)
    config = load_config(DPOConfig, None, [f"model.path={checkpoint}", f"data.train=[{path}]", "train.precision=fp32",
                                           f"output.dir={tmp_path / 'out'}", f"dpo.beta={beta}", "train.max_steps=1",
                                           f"dpo.sft_weight={alpha}", "data.empty_think=train"])  # as TRL
    template = ChatTemplate.from_pretrained(checkpoint)
    objective = DPO(beta, alpha, "cached")
    datasets, _, _ = objective.load_data(config, template, Dist())
    pairs = datasets[0]
    # the same tokens as TRL's own tokenisation: the prompt, then the reply through <|im_end|>
    for pair, feature in zip(pairs, trl_features):
        for example, reply in ((pair.chosen, feature["chosen_ids"]), (pair.rejected, feature["rejected_ids"])):
            supervised = (example.labels != -100).nonzero()[0]
            assert example.input_ids[:supervised[0]].tolist() == feature["prompt_ids"]
            assert example.input_ids[supervised].tolist() == reply[:-1] and supervised[-1] == len(example) - 2

    model = load_model(checkpoint, dtype=torch.float32)
    objective.prepare(model, config, None, Dist(), contextlib.nullcontext)
    longest = max(len(p) for p in pairs)
    batches = pack_pairs(pairs, longest + 1, seed=0)  # several micro-batches: the step's normalisers must hold
    assert len(batches) > 1
    step = objective.train_step(model, batches, Dist(), None, contextlib.nullcontext)
    loss, metrics = step.loss_sum, step.metrics
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    _assert_close_to_trl(model, loss, trl_loss, trl_grads)


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """A separately initialised tiny model (same architecture and tokenizer as the policy): a reference ≠ policy,
    with logits large enough that the log-ratios are far from 0."""
    return save_chat_checkpoint(tmp_path_factory.mktemp("dpo-ref") / "reference", seed=11, initializer_range=0.2)


@pytest.fixture(scope="module")
def trl_with_reference(checkpoint, reference_checkpoint):
    return _trl_loss_and_grads(checkpoint, ROWS, 0.3, [0.0, 0.7], reference=reference_checkpoint)[0]


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["cached", "live"])
def test_a_separate_reference_model_gives_trls_loss_rewards_and_gradients(checkpoint, reference_checkpoint,
                                                                         trl_with_reference, reference, tmp_path):
    path = write_rows(tmp_path / "pairs.jsonl", ROWS)
    template = ChatTemplate.from_pretrained(checkpoint)
    for alpha, (trl_loss, trl_grads, trl_metrics) in trl_with_reference.items():
        assert abs(trl_metrics["rewards/margins"]) > 0.05 and 0 < trl_metrics["rewards/accuracies"] < 1
        config = load_config(DPOConfig, None, [
            f"model.path={checkpoint}", f"data.train=[{path}]", "train.precision=fp32", f"output.dir={tmp_path}",
            f"dpo.reference={reference}", f"dpo.reference_model={reference_checkpoint}", f"dpo.sft_weight={alpha}",
            "data.empty_think=train"])  # TRL supervises the whole completion, an empty think block included
        objective = DPO(0.3, alpha, reference, str(tmp_path / "reference"), str(reference_checkpoint))
        pairs = objective.load_data(config, template, Dist())[0][0]
        model = load_model(checkpoint, dtype=torch.float32)
        objective.prepare(model, config, None, Dist(), contextlib.nullcontext)
        batches = pack_pairs(pairs, max(len(p) for p in pairs) + 1, seed=0)
        step = objective.train_step(model, batches, Dist(), None, contextlib.nullcontext)
        loss, metrics = step.loss_sum, step.metrics
        _assert_close_to_trl(model, loss, trl_loss, trl_grads)
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                     "logps/rejected"):
            assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name
    if reference == "cached":  # computed once (the second α read it), under a key naming the reference
        assert len(list((tmp_path / "reference").glob("*.pt"))) == 1
        assert objective._cache_key(config) != DPO(0.3, alpha, reference)._cache_key(config)


def _overrides(files, tmp_path, out, **extra):
    rows = [json.loads(line) for line in Path(files["train"]).read_text(encoding="utf-8").splitlines()]
    pairs = []
    for row in rows[:16]:  # chosen: the reference answer with its reasoning; rejected: a non-answer
        pairs.append({"messages": row["messages"][:-1], "chosen": row["messages"][-1],
                      "rejected": "Tôi không biết. Đáp án: 0"})
    path = write_rows(tmp_path / "pairs.jsonl", pairs)
    settings = {"model.config": files["model_config"], "model.tokenizer": "qwen3", "data.train": f"[{path}]",
                "data.eval": f"[{path}]", "data.max_tokens": 1024, "vocab.restrict": "data", "optim.lr": 1e-3,
                "train.max_steps": 4, "train.precision": "fp32", "output.dir": str(out), "output.progress": False,
                "output.tensorboard": False, "dpo.beta": 0.5, "dpo.sft_weight": 0.2, "train.eval_every": 4}
    settings.update(extra)
    return ["--config", str(write_rows(tmp_path / "empty.yaml", []) and tmp_path / "empty.yaml")] + [
        f"{k}={v}" for k, v in settings.items()]


def _records(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_recipe_trains_caches_the_reference_and_resumes_exactly(tiny_run_files, tmp_path):
    full = tmp_path / "full"
    assert dpo_main(_overrides(tiny_run_files, tmp_path, full, **{"train.save_every": 2})) == 0
    records = [r for r in _records(full) if "loss" in r]
    assert len(records) == 4 and {"rewards/accuracies", "rewards/margins", "dpo_loss", "sft_loss"} <= set(records[0])
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # starting weights == reference
    evals = [r for r in _records(full) if "eval_dpo_loss" in r]
    assert evals[-1]["eval_dpo_loss"] < 0.5 < 0.9 < evals[-1]["eval_rewards/accuracies"]  # log 2 = 0.69 at the start
    assert len(list((full / "reference").glob("*.pt"))) == 1 and (full / "final/model.safetensors").is_file()
    assert len(list((full / "cache").iterdir())) == 1  # the tokenised pairs (data.train = data.eval here)

    resumed = tmp_path / "resumed"
    assert dpo_main(_overrides(tiny_run_files, tmp_path, resumed, **{
        "train.resume": str(full / "checkpoints/step-2"), "dpo.reference_dir": str(full / "reference")})) == 0
    assert [r["loss"] for r in _records(resumed) if "loss" in r] == [r["loss"] for r in records[2:]]

    live = tmp_path / "live"
    assert dpo_main(_overrides(tiny_run_files, tmp_path, live, **{"dpo.reference": "live"})) == 0
    live_losses = [r["loss"] for r in _records(live) if "loss" in r]
    assert live_losses == pytest.approx([r["loss"] for r in records], rel=1e-5)


@pytest.mark.slow
def test_cached_and_live_separate_reference_give_the_same_trajectory(tiny_run_files, reference_checkpoint, tmp_path):
    """dpo.reference_model: the log-probs cached before step 1 are those the live reference gives at every step."""
    losses = {}
    for reference in ("cached", "live"):
        out = tmp_path / reference
        assert dpo_main(_overrides(tiny_run_files, tmp_path, out, **{
            "dpo.reference": reference, "dpo.reference_model": reference_checkpoint, "train.eval_every": 0,
            "data.eval": "[]"})) == 0
        records = [r for r in _records(out) if "loss" in r]
        assert abs(records[0]["rewards/margins"]) > 1e-3  # reference ≠ starting weights
        losses[reference] = [r["loss"] for r in records]
    assert len(losses["live"]) == 4 and losses["live"] == pytest.approx(losses["cached"], rel=1e-5)


def test_a_reference_model_that_cannot_serve_is_a_one_line_error(checkpoint, tmp_path):
    from qwen3_fixtures import save_hf_qwen3

    from qforge.engine.errors import ConfigError

    config = load_config(DPOConfig, None, [f"model.path={checkpoint}", "data.train=[x.jsonl]", "train.precision=fp32"])
    model = load_model(checkpoint, dtype=torch.float32)
    other_vocab = save_hf_qwen3(tmp_path / "small")  # vocabulary 512: another tokenizer
    for path, message in ((tmp_path / "missing", "no config.json"), (other_vocab, "vocabulary size 512 differs")):
        with pytest.raises(ConfigError, match=f"dpo.reference_model={path}: {message}"):
            DPO(reference="live", reference_model=str(path))._reference_model(model, config, Dist())


def test_the_recipe_checks_the_reference_model_before_reading_the_pairs(tiny_run_files, tmp_path, capsys):
    overrides = _overrides(tiny_run_files, tmp_path, tmp_path / "out", **{
        "dpo.reference_model": str(tmp_path / "missing"), "data.train": f"[{tmp_path / 'no-pairs.jsonl'}]"})
    assert dpo_main(overrides) == 2  # a ConfigError, about the reference, not the missing data file
    assert f"dpo.reference_model={tmp_path / 'missing'}: no config.json" in capsys.readouterr().err


def test_a_live_reference_is_frozen_in_the_compute_dtype(checkpoint, reference_checkpoint):
    """bf16-mixed: the policy keeps fp32 master weights, the reference (never updated) is stored in bf16 —
    half the memory — and fp32 runs keep it in fp32."""
    model = load_model(checkpoint, dtype=torch.float32)
    for precision, dtype in (("bf16-mixed", torch.bfloat16), ("fp32", torch.float32)):
        config = load_config(DPOConfig, None, [f"model.path={checkpoint}", "data.train=[x.jsonl]",
                                               f"train.precision={precision}"])
        reference = DPO(reference="live", reference_model=str(reference_checkpoint))._reference_model(
            model, config, Dist())
        assert {p.dtype for p in reference.parameters()} == {dtype} and not reference.training
        assert not any(p.requires_grad for p in reference.parameters())


def test_an_empty_prompt_is_a_bad_row(tmp_path, qwen_tokenizer_dir):
    template = ChatTemplate.from_pretrained(qwen_tokenizer_dir)
    for bad in ({"prompt": "", "chosen": "a", "rejected": "b"},
                {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": " \n"}],
                 "chosen": "a", "rejected": "b"}):
        path = write_rows(tmp_path / "bad.jsonl", [ROWS[0], bad])
        with pytest.raises(DataError, match=r"bad.jsonl:2: (prompt|messages): empty prompt"):
            load_pairs([path], template)


def test_pairs_all_longer_than_max_tokens_say_so(tiny_run_files, tmp_path, capsys):
    assert dpo_main(_overrides(tiny_run_files, tmp_path, tmp_path / "out", **{"data.max_tokens": 64})) == 3
    err = capsys.readouterr().err
    assert re.search(r"pairs.jsonl: every pair is longer than data.max_tokens=64 \(both sides together; the "
                     r"shortest has \d+\); raise data.max_tokens to at least \d+", err), err


def test_a_resume_with_another_reference_model_is_refused(tiny_run_files, reference_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert dpo_main(_overrides(tiny_run_files, tmp_path, out, **{"train.max_steps": 1, "data.eval": "[]",
                                                                 "train.eval_every": 0})) == 0
    assert dpo_main(_overrides(tiny_run_files, tmp_path, out, **{
        "train.max_steps": 2, "data.eval": "[]", "train.eval_every": 0, "train.resume": "auto",
        "dpo.reference_model": reference_checkpoint})) == 4
    assert "step-1 was trained with dpo.reference_model=null, this run sets" in capsys.readouterr().err
