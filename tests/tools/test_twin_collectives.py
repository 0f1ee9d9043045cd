"""The twin's rank-divergence check: every fake rank's collectives (op, shapes, dtypes, group) must agree, or the
twin fails naming the first one two ranks disagree on (on a cluster: a hang until the NCCL timeout)."""
import json

import pytest

from qforge.engine.train.parallel import Dist
from qforge.tools.twin.collectives import CollectiveDivergence, first_divergence
from qforge.tools.twin.run import TwinPlan, check_collectives

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("twin") / "config.json"
    path.write_text(json.dumps(TINY | {"model_type": "qwen3"}))
    return TwinPlan(model=str(path), gpus=2, tokens=128, seq_len=64)


def test_the_real_step_issues_the_same_collectives_on_every_rank(plan):
    result = check_collectives(plan)
    calls = result["collectives"]
    ops = [call["op"] for call in calls]
    # one FSDP all-gather per unit (2 blocks + root) in the forward, the blocks' again in the backward;
    # one reduce-scatter per unit; Σw and the loss sum all-reduced; the global gradient norm
    assert ops.count("_allgather_base_") == 5 and ops.count("_reduce_scatter_base_") == 3
    assert ops.count("allreduce_") == 2 and ops[-1] == "all_reduce"
    assert result["collectives_checked"] == {"ranks": 2, "per_rank": len(calls)}
    gathers = [call for call in calls if call["op"] == "_allgather_base_"]
    assert all(call["dtypes"] == ["bfloat16", "bfloat16"] for call in gathers)  # bf16-mixed: gathered in bf16
    assert all(call["shapes"][0][0] == 2 * call["shapes"][1][0] for call in gathers)  # output = world × input


def test_a_rank_skipping_an_all_reduce_fails_the_twin_naming_it(plan, monkeypatch):
    _rank1_skips_all_reduces(monkeypatch)
    with pytest.raises(CollectiveDivergence) as error:
        check_collectives(plan)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("collective #1: rank 0 issues allreduce_(float64[]; group 0) at "
                              "engine/train/parallel.py:")
    assert "rank 1 issues _allgather_base_(" in message and "a hang" in message


def _call(op, shape, dtype="float32", group="0"):
    return {"op": op, "shapes": [shape], "dtypes": [dtype], "group": group, "region": "step", "site": "x.py:1 (f)"}


def test_first_divergence_names_shape_dtype_group_and_missing_calls():
    base = [_call("allreduce_", [4]), _call("_allgather_base_", [8])]
    assert first_divergence({0: base, 1: list(base)}) is None
    assert "rank 1 issues allreduce_(float32[5]" in first_divergence({0: base, 1: [_call("allreduce_", [5])] + base[1:]})
    assert "rank 2 issues allreduce_(bfloat16[4]" in first_divergence(
        {0: base, 1: base, 2: [_call("allreduce_", [4], "bfloat16"), base[1]]})
    assert "group 7" in first_divergence({0: base, 1: [base[0], _call("_allgather_base_", [8], group="7")]})
    assert first_divergence({0: base, 1: base[:1]}).startswith(
        "collective #2: rank 0 issues _allgather_base_(float32[8]; group 0) at x.py:1 (f) [step], rank 1 issues none")
    assert first_divergence({0: base[:1], 1: base}).startswith("collective #2: rank 1 issues _allgather_base_(")



def _rank1_skips_all_reduces(monkeypatch):
    """The deliberately divergent stand-in: rank 1 computes its sums locally, never joining the all-reduce."""
    original = Dist.all_reduce_sum

    def all_reduce_sum(self, value):
        return original(Dist(self.rank, 1, self.device) if self.rank == 1 else self, value)

    monkeypatch.setattr(Dist, "all_reduce_sum", all_reduce_sum)


def test_cli_checks_collectives_and_exits_2_on_a_divergence(plan, monkeypatch, capsys):
    from qforge.tools.twin.__main__ import main

    argv = ["--model", plan.model, "--gpus", "2", "--tokens", "128", "--seq-len", "64", "--check-collectives"]
    assert main(argv) == 0
    assert "collectives: the same 11 (op, shapes, dtypes, group) on all 2 ranks" in capsys.readouterr().out
    _rank1_skips_all_reduces(monkeypatch)
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("rank-divergent collectives: collective #1: rank 0 issues allreduce_(")
