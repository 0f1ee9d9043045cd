"""The HF exports traced by the twin on every fake rank, nothing written: save_model (full fine-tuning's final/)
gathers one parameter at a time in the output dtype and spreads the files over the ranks; full_state_dict (LoRA's
export, snapshots) gathers fp32 one tensor at a time on the device and holds the whole fp32 model on rank 0's
host only. Both issue the same collectives on every rank."""
import json

import pytest

from qforge.engine.config import Qwen3Config
from qforge.tools.estimate import parameter_counts
from qforge.tools.twin.collectives import CollectiveDivergence
from qforge.tools.twin.export import trace_export

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6)
PARAMS = parameter_counts(Qwen3Config(**TINY))["total"]
EMBEDDING = TINY["vocab_size"] * TINY["hidden_size"]  # the largest tensor (elements)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("twin") / "config.json"
    path.write_text(json.dumps(TINY | {"model_type": "qwen3"}))
    return str(path)


def test_save_model_gathers_one_tensor_at_a_time_and_rank_i_writes_file_i(tiny, monkeypatch):
    from qforge.engine.checkpoint import save as checkpoint

    monkeypatch.setattr(checkpoint, "parse_size", lambda size: 4 * EMBEDDING)  # several files: 2×embedding in bf16
    result = trace_export(tiny, 2, what="save_model")
    ranks = result["ranks"]
    assert sum(r["written_bytes"] for r in ranks) == 2 * PARAMS  # every tensor once, in bf16
    assert all(r["files"] >= 1 for r in ranks)  # file i by rank i % 2
    for r in ranks:
        assert r["shard_bytes"] == 4 * PARAMS / 2
        # above the fp32 shards: one full bf16 tensor and its bf16-cast shard, never the model
        assert r["device_peak_bytes"] - r["shard_bytes"] == 2 * EMBEDDING + 2 * EMBEDDING / 2
        assert r["peak_host_bytes"] <= 4 * EMBEDDING + 64  # one file's tensors at a time
    assert result["collectives_per_rank"] > 3 + 11 * TINY["num_hidden_layers"]  # one gather per tensor, + barriers


def test_full_state_dict_holds_the_fp32_model_on_rank_0_host_only(tiny):
    ranks = trace_export(tiny, 2, what="full_state_dict")["ranks"]
    assert ranks[0]["peak_host_bytes"] >= 4 * PARAMS  # cpu_offload: the whole fp32 model, rank 0 only
    assert ranks[1]["peak_host_bytes"] < 4096
    for r in ranks:  # the device gathers one fp32 tensor at a time
        assert r["device_peak_bytes"] - r["shard_bytes"] == 4 * EMBEDDING


def test_an_export_that_gathers_on_rank_0_only_is_a_divergence(tiny, monkeypatch):
    """A deliberately wrong export: only rank 0 gathers (the ranks' collectives differ: a hang on a cluster)."""
    import torch.distributed as dist

    from qforge.engine.checkpoint import save as checkpoint

    gathered = checkpoint.gathered
    monkeypatch.setattr(checkpoint, "gathered", lambda param, dtype: gathered(param, dtype) if dist.get_rank() == 0
                        else param.to(dtype).to_local())
    with pytest.raises(CollectiveDivergence, match=r"^collective #1: rank 0 issues all_gather_into_tensor\(.*"
                                                   r"engine/checkpoint/save\.py:\d+ \(gathered\).*rank 1 issues "):
        trace_export(tiny, 2, what="save_model")


def test_cli_prints_the_export_table(tiny, capsys):
    from qforge.tools.twin.__main__ import main

    assert main(["--model", tiny, "--gpus", "2", "--trace-export", "full_state_dict"]) == 0
    out = capsys.readouterr().out
    assert "full_state_dict (fp32, offloaded to rank 0's host" in out and "on all 2 ranks" in out


@pytest.mark.parametrize("state_dtype, moment_bytes", [("fp32", 4), ("bf16", 2)])
def test_checkpoint_state_is_each_ranks_own_shards_and_gathers_nothing(tiny, state_dtype, moment_bytes):
    from qforge.tools.twin.export import trace_checkpoint_state

    tensors = 3 + 11 * TINY["num_hidden_layers"]
    ranks = trace_checkpoint_state(tiny, 2, optim_state_dtype=state_dtype)["ranks"]
    for r in ranks:
        # fp32 master weights + two AdamW moments, 1/2 each; AdamW's step counters are tiny
        shards = (4 + 2 * moment_bytes) * PARAMS / 2
        assert shards <= r["state_bytes"] <= shards + 8 * tensors
        assert r["state_bytes"] <= r["written_bytes"] <= r["state_bytes"] + 64 * 1024  # + pickled param groups
        assert shards <= r["device_peak_bytes"] <= r["state_bytes"]  # the shards, no gathered or copied tensor
    assert ranks[0]["written_bytes"] == ranks[1]["written_bytes"]
