"""`checkpoint.load_sharded` traced by the twin on a header-only checkpoint (no tensor data on disk): each rank
reads only its rows, in the stored dtype, one buffer at a time, and its device holds its shards only."""
import json

import pytest

from qforge.engine.config import Qwen3Config
from qforge.tools.estimate import parameter_counts
from qforge.tools.twin.contracts import ContractError
from qforge.tools.twin.load import trace_load

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("twin") / "config.json"
    path.write_text(json.dumps(TINY | {"model_type": "qwen3"}))
    return str(path)


@pytest.mark.parametrize("gpus", [2, 3])  # 3: rows that do not divide evenly (512 = 171 + 171 + 170)
def test_each_rank_reads_its_rows_once_in_the_stored_dtype(tiny, gpus):
    params = parameter_counts(Qwen3Config(**TINY))["total"]
    result = trace_load(tiny, gpus)
    assert result["checkpoint_bytes"] == 2 * params  # bf16 on "disk"
    ranks = result["ranks"]
    assert sum(r["read_bytes"] for r in ranks) == result["checkpoint_bytes"]  # every row once (checked per tensor)
    embedding_rows = -(-TINY["vocab_size"] // gpus) * TINY["hidden_size"] * 2
    tensors, widest_row = 3 + 11 * TINY["num_hidden_layers"], 2 * TINY["intermediate_size"]  # bytes, bf16
    for rank in ranks:  # 1/world of every tensor, at most one more row each where the rows do not divide
        assert rank["read_bytes"] <= result["checkpoint_bytes"] / gpus + tensors * widest_row
        assert rank["largest_read_bytes"] == rank["peak_host_buffer_bytes"]  # one read buffer alive at a time
        assert embedding_rows - 256 <= rank["largest_read_bytes"] <= embedding_rows  # its rows of the embedding
        assert rank["param_dtypes"] == ["float32"]  # bf16-mixed: bf16 rows into fp32 master shards
    # the device holds the fp32 shards (FSDP pads the last rank's to rank 0's size, copying one tensor's shard
    # into its padded storage at a time) and the RoPE buffers, nothing of a whole tensor
    padded, one_shard = ranks[0]["shard_bytes"], 2 * embedding_rows
    assert all(r["shard_bytes"] <= r["device_peak_bytes"] <= padded + 4096 + (one_shard if gpus == 3 else 0)
               for r in ranks)
    assert sum(r["shard_bytes"] for r in ranks) >= 4 * params


def test_pure_bf16_shards_hold_what_was_read(tiny):
    ranks = trace_load(tiny, 2, precision="bf16")["ranks"]
    assert all(r["param_dtypes"] == ["bfloat16"] and r["shard_bytes"] == r["read_bytes"] for r in ranks)


def test_a_rank_reading_whole_tensors_breaks_the_contract(tiny, monkeypatch):
    """The bug of issue #12 (every rank loads the whole model), injected: each slice is read whole, then cut."""
    from qforge.tools.twin import load

    read_rows = load._Slice.__getitem__
    monkeypatch.setattr(load._Slice, "__getitem__", lambda self, index: read_rows(self, slice(None))[index])
    with pytest.raises(ContractError, match=r"model.embed_tokens.weight \[512, 128\]: rank 0 reads .*a full copy"):
        trace_load(tiny, 2)




def test_cli_prints_the_load_table(tiny, capsys):
    from qforge.tools.twin.__main__ import main

    assert main(["--model", tiny, "--gpus", "2", "--trace-load"]) == 0
    out = capsys.readouterr().out
    assert "on 2 ranks, bf16-mixed (twin bounds, not a measurement)" in out and "50.0%" in out
