"""A tiny FFT run: random-init Qwen3 with the real tokenizer on a slice of the shipped arithmetic data."""
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
TINY_MODEL = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=1024,
                  tie_word_embeddings=True, torch_dtype="float32")


@pytest.fixture(scope="session")
def tiny_run_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fft")
    (root / "config.json").write_text(json.dumps(TINY_MODEL))
    rows = (REPO / "recipes/data/vi_arith_train.jsonl").read_text(encoding="utf-8").splitlines()
    (root / "train.jsonl").write_text("\n".join(rows[:48]) + "\n", encoding="utf-8")
    (root / "eval.jsonl").write_text("\n".join(rows[48:56]) + "\n", encoding="utf-8")
    return {"model_config": str(root / "config.json"), "train": str(root / "train.jsonl"),
            "eval": str(root / "eval.jsonl"), "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def few_rows(tiny_run_files, tmp_path_factory):
    """Six training rows of the tiny run (objectives that score or sample every row stay quick)."""
    path = tmp_path_factory.mktemp("few") / "train.jsonl"
    path.write_text("".join(Path(tiny_run_files["train"]).read_text(encoding="utf-8").splitlines(True)[:6]),
                    encoding="utf-8")
    return {**tiny_run_files, "train": str(path)}


def tiny_overrides(files: dict, output_dir, **extra) -> list[str]:
    settings = {
        "model.config": files["model_config"], "model.tokenizer": "qwen3",
        "data.train": f"[{files['train']}]", "data.max_tokens": 512, "data.cache_dir": files["cache"],
        "vocab.restrict": "data", "optim.lr": 3e-3, "optim.warmup_steps": 2, "train.max_steps": 6,
        "train.precision": "fp32", "train.seed": 0, "output.dir": str(output_dir), "output.progress": False,
        "output.tensorboard": False,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]
