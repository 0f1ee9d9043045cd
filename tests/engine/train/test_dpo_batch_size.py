"""DPO with train.batch_size (pairs per optimizer step): the loader deals whole pairs to micro-batches and ranks,
the step is normalised by its pairs however it is split, fillers add nothing, resume is exact."""
import contextlib
import json

import pytest
import torch
from test_dpo import ROWS, _overrides, _records, checkpoint, reference_checkpoint, write_rows  # noqa: F401
from tiny_run import tiny_run_files  # noqa: F401 (fixture)

from qforge.engine import load_model
from qforge.engine.config_io import load_config
from qforge.engine.data import ChatTemplate
from qforge.engine.data.preference import pack_pairs
from qforge.engine.errors import ConfigError
from qforge.engine.train.build import resolve_tokenizer_dir
from qforge.engine.train.distill import OnPolicyDistill
from qforge.engine.train.dpo import DPO
from qforge.engine.train.loader import SequenceStepLoader, build_loader
from qforge.engine.train.parallel import Dist
from qforge.recipes.dpo import DPOConfig, main as dpo_main


@pytest.fixture(scope="module")
def pair_config(tiny_run_files, tmp_path_factory):
    """30 pairs of ~150 tokens from the tiny run's rows; data.max_tokens=400 holds two pairs."""
    root = tmp_path_factory.mktemp("dpo-pairs")
    rows = [json.loads(line) for line in open(tiny_run_files["train"], encoding="utf-8").read().splitlines()[:30]]
    path = write_rows(root / "pairs.jsonl", [{"messages": r["messages"][:-1], "chosen": r["messages"][-1],
                                              "rejected": "Tôi không biết. Đáp án: 0"} for r in rows])
    return load_config(DPOConfig, None, [f"model.config={tiny_run_files['model_config']}", "model.tokenizer=qwen3",
                                         f"data.train=[{path}]", "data.max_tokens=400", f"output.dir={root}"])


def test_steps_of_n_pairs_cover_the_epoch_split_over_ranks_and_resume_exactly(pair_config):
    config, objective = pair_config, DPO()
    template = ChatTemplate.from_pretrained(resolve_tokenizer_dir(config.model))
    datasets, _, _ = objective.load_data(config, template, Dist())

    def loaders():
        return [SequenceStepLoader(datasets, config.data, seed=1, batch_size=7, rank=r, world=2,
                                   pack_fn=objective.pack, filler=objective.filler) for r in range(2)]

    ranks, seen = loaders(), []
    assert ranks[0].steps_per_epoch == 5  # 30 pairs: four steps of 7 and one of 2
    for step in range(5):
        per_rank = [loader.next_step() for loader in ranks]
        assert len(per_rank[0]) == len(per_rank[1])  # every rank runs as many forwards
        batches = [b for batches in per_rank for b in batches]
        assert sum(b.num_pairs for b in batches) == (7 if step < 4 else 2)
        fillers = [b for b in batches if b.num_pairs == 0]
        assert all(b.num_loss_tokens == 0 and len(b.cu_seqlens) == 3 for b in fillers)
        for batch in batches:  # both sides of each pair in the same micro-batch, chosen then rejected
            assert batch.num_tokens <= 400 and len(batch.cu_seqlens) - 1 == 2 * max(batch.num_pairs, 1)
        seen += [int(i) for b in batches for i in b.pair_index]
    assert sorted(seen) == list(range(30)) and ranks[0].epoch_progress == 1.0
    resumed = loaders()[1]  # a rank restarted from the cursor a checkpoint holds, into the next epoch
    resumed.load_state_dict(ranks[1].state_dict())
    for _ in range(3):
        want, got = ranks[1].next_step(), resumed.next_step()
        assert [b.pair_index.tolist() for b in got] == [b.pair_index.tolist() for b in want]
        assert all(torch.equal(a.packed.input_ids, b.packed.input_ids) for a, b in zip(want, got))


@pytest.mark.parametrize("reference", ["cached", "live"])
def test_a_step_is_normalised_by_its_pairs_however_it_is_split(checkpoint, reference_checkpoint, tmp_path, reference):
    """One micro-batch of N pairs == the same N pairs over several micro-batches plus a filler (loss, metrics,
    gradients), against a reference ≠ policy and with the SFT term on."""
    path = write_rows(tmp_path / "pairs.jsonl", ROWS)
    config = load_config(DPOConfig, None, [f"model.path={checkpoint}", f"data.train=[{path}]", "train.precision=fp32",
                                           f"output.dir={tmp_path}"])
    template = ChatTemplate.from_pretrained(checkpoint)
    results = []
    for split in (False, True):
        objective = DPO(0.3, 0.7, reference, str(tmp_path / "reference"), str(reference_checkpoint))
        pairs = objective.load_data(config, template, Dist())[0][0]
        model = load_model(checkpoint, dtype=torch.float32)
        objective.prepare(model, config, None, Dist(), contextlib.nullcontext)
        if split:
            batches = pack_pairs(pairs, max(len(p) for p in pairs) + 1, seed=0)
            batches = batches[:1] + [objective.filler(pairs[0], 4096)] + batches[1:]
            assert len(batches) > 2
        else:
            batches = pack_pairs(pairs, 4096, seed=0)
            assert len(batches) == 1
        step = objective.train_step(model, batches, Dist(), None, contextlib.nullcontext)
        results.append((step.loss_sum / step.weight, step.metrics, [p.grad.clone() for p in model.parameters()]))
    (one, one_metrics, one_grads), (split_loss, split_metrics, split_grads) = results
    assert split_loss == pytest.approx(one, rel=1e-6) and abs(one_metrics["rewards/margins"]) > 0.05
    assert split_metrics == pytest.approx(one_metrics, rel=1e-5, abs=1e-6)
    # fp32 sums of the same terms in another order (micro-batches, and torch's threads: 2 OpenMP threads moved one
    # head-gradient element by 1.6e-6 of the largest); a wrong normalisation would be off by a whole pair's share
    for a, b in zip(one_grads, split_grads):
        torch.testing.assert_close(b, a, atol=4e-6 * a.abs().max().item(), rtol=0)


def test_on_policy_distillation_with_batch_size_is_a_one_line_error(pair_config):
    settings = load_config(DPOConfig, None, [f"model.config={pair_config.model.config}", "model.tokenizer=qwen3",
                                             "data.train=[x.jsonl]", "train.batch_size=4"])
    with pytest.raises(ConfigError, match=r"train.batch_size does not apply to OnPolicyDistill: .* filler micro-"):
        build_loader([[]], settings.data, settings.train, objective=OnPolicyDistill("teacher"))


@pytest.mark.slow
def test_recipe_with_pairs_per_step_resumes_exactly(tiny_run_files, tmp_path):
    """16 pairs, 6 per step (the third step of an epoch holds 4), two pairs per micro-batch."""
    extra = {"train.batch_size": 6, "data.max_tokens": 400, "train.eval_every": 0, "data.eval": "[]"}
    full = tmp_path / "full"
    assert dpo_main(_overrides(tiny_run_files, tmp_path, full, **extra, **{"train.save_every": 2})) == 0
    records = [r for r in _records(full) if "loss" in r]
    assert [round(r["epoch"], 6) for r in records] == [round(x, 6) for x in (1 / 3, 2 / 3, 1, 4 / 3)]
    resumed = tmp_path / "resumed"
    assert dpo_main(_overrides(tiny_run_files, tmp_path, resumed, **extra, **{
        "train.resume": str(full / "checkpoints/step-2"), "dpo.reference_dir": str(full / "reference")})) == 0
    assert [r["loss"] for r in _records(resumed) if "loss" in r] == [r["loss"] for r in records[2:]]


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["cached", "live"])
def test_two_rank_fsdp2_with_pairs_per_step_matches_one_process(tiny_run_files, tmp_path, reference):
    """5 pairs a step, two per micro-batch: 3 micro-batches, so one rank also runs a filler; the reference
    log-probs are cached with the sharded starting weights (which must be resharded before the optimizer), or
    a live sharded reference scores every micro-batch (and reshards after each forward)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from tiny_run import REPO

    extra = {"train.batch_size": 5, "data.max_tokens": 400, "train.max_steps": 3, "train.eval_every": 0,
             "data.eval": "[]", "dpo.reference": reference}
    single = tmp_path / "single"
    assert dpo_main(_overrides(tiny_run_files, tmp_path, single, **extra)) == 0
    sharded = tmp_path / "fsdp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "recipes/dpo.py"), *_overrides(tiny_run_files, tmp_path, sharded, **extra)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = ([r["loss"] for r in _records(out) if "loss" in r] for out in (single, sharded))
    assert len(got) == 3 and got == pytest.approx(expected, rel=1e-5)
    want, have = (load_file(out / "final/model.safetensors") for out in (single, sharded))
    for key in want:
        torch.testing.assert_close(have[key], want[key], atol=1e-6, rtol=0, msg=key)
