"""benchmarks/rollout.py's dry run: both systems decode the same rollout batch from the same weights (their greedy
tokens agree), runs alternate round by round, tokens are counted and the ratio is reported."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import rollout  # noqa: E402


def test_dry_run_reports_both_systems_on_the_same_model(capsys):
    assert rollout.main(["--dry-run"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["same_greedy_tokens"] == {"full": True}  # no kept_ids.json: the whole vocabulary only
    assert [r["system"] for r in result["runs"]] == ["qforge", "hf", "hf", "qforge"]
    # 2 prompts × 2 completions, ≤ 4 tokens each; random weights rarely stop early
    assert all(0 < r["tokens"] <= 16 and r["seconds"] > 0 and 1 < r["decode_steps"] <= 5 for r in result["runs"])
    assert len(result["speedups"]["full"]) == 2 and result["speedup_median"]["full"] > 0
    assert result["batch"] == {"prompts": 2, "generations": 2, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4,
                               "kept_vocab": None}


def test_a_pruned_checkpoint_samples_its_kept_ids_in_both_systems(tmp_path, capsys):
    """With kept_ids.json, HF suppresses every other id and qforge computes only the kept rows: the same
    distribution, so greedy tokens still agree; the whole vocabulary runs interleaved with it, round by round."""
    from qforge.engine.vocab import VocabMap

    path = rollout.build_checkpoint(tmp_path / "model", dry_run=True)
    kept = list(range(0, 151936, 50)) + [151643, 151645]
    VocabMap.from_ids(kept, 151936).save_with_model(path)
    assert rollout.main(["--dry-run", "--model", str(path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["same_greedy_tokens"] == {"kept": True, "full": True}
    assert result["batch"]["kept_vocab"] == len(set(kept))
    order = [(r["vocab"], r["system"]) for r in result["runs"]]
    assert order[:4] == [("kept", "qforge"), ("kept", "hf"), ("full", "qforge"), ("full", "hf")]
    assert order[4:] == order[:4][::-1]
    assert set(result["speedups"]) == {"kept", "full"}
