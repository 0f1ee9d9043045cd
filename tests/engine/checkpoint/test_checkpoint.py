"""HF-format load/save: round trips with transformers, sharding, atomic writes, clear errors on bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from qwen3_fixtures import save_hf_qwen3
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qforge.engine import CheckpointError, ConfigError, load_model, save_model
from qforge.engine.checkpoint import read_source
from qforge.engine.checkpoint import save as save_module


def _ids():
    return torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("tied", [True, False])
def test_qforge_save_loads_in_transformers_with_same_logits(tmp_path, tied):
    src = save_hf_qwen3(tmp_path / "src", tie_word_embeddings=tied)
    ours = load_model(src, dtype=torch.float32)
    out = save_model(ours, tmp_path / "out", max_shard_size="60KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(_ids()).logits, ours(_ids()), atol=1e-5, rtol=1e-5)
    reloaded = load_model(out, dtype=torch.float32)
    for (name, a), (_, b) in zip(ours.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a, b), name


def test_hf_sharded_checkpoint_loads(tmp_path):
    src = save_hf_qwen3(tmp_path / "sharded", max_shard_size="50KB", tie_word_embeddings=False)
    assert (src / "model.safetensors.index.json").is_file()
    ours = load_model(src, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()), theirs(_ids()).logits, atol=1e-5, rtol=1e-5)


def test_dtype_and_generation_config_round_trip(tmp_path):
    src = save_hf_qwen3(tmp_path / "src")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "temperature": 0.6}))
    source = read_source(src)
    model = load_model(source)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not set(vars(model)) & {"source_dtype", "generation_config", "source_checkpoint"}  # nothing stuck on it
    out = save_model(model, tmp_path / "out", source)  # by default in the source checkpoint's dtype (fp32 here)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": [7, 9], "temperature": 0.6}
    plain = save_model(model, tmp_path / "plain")  # no source: the parameters' dtype and the config's special ids
    assert {t.dtype for t in load_file(plain / "model.safetensors").values()} == {torch.bfloat16}
    assert "temperature" not in json.loads((plain / "generation_config.json").read_text())
    out = save_model(model, tmp_path / "bf16", source, dtype=torch.bfloat16)  # output.dtype overrides it
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_missing_wrong_shape_and_unexpected_tensors_are_listed_together(tmp_path):
    src = save_hf_qwen3(tmp_path / "bad", tie_word_embeddings=False)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    tensors["model.layers.9.extra.weight"] = torch.zeros(1)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_model(src)
    message = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in message
    assert "model.layers.1.self_attn.q_proj.weight: checkpoint [3, 3]" in message
    assert "model.layers.9.extra.weight" in message


def test_untied_checkpoint_without_lm_head_is_an_error(tmp_path):
    src = save_hf_qwen3(tmp_path / "untied", tie_word_embeddings=False)
    tensors = load_file(src / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tie_word_embeddings=false, so lm_head.weight is required"):
        load_model(src)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("sharded", [False, True])
def test_damaged_safetensors_is_a_one_line_checkpoint_error(tmp_path, damage, sharded):
    src = save_hf_qwen3(tmp_path / "src", max_shard_size="50KB" if sharded else "5GB")
    file = sorted(src.glob("*.safetensors"))[-1]
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) - 100], "garbage": b"not a tensor file" * 9, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=rf"{file.name}: not a readable safetensors file \(.+\); it is "
                                              r"truncated or damaged: copy or export it again") as err:
        load_model(src)
    assert "\n" not in str(err.value)


def test_exported_files_get_the_mode_a_plain_open_would(tmp_path):
    umask = os.umask(0o022)
    try:
        out = save_model(load_model(save_hf_qwen3(tmp_path / "src")), tmp_path / "out")
    finally:
        os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}


def test_bad_json_names_file_and_line(tmp_path):
    src = save_hf_qwen3(tmp_path / "badjson")
    (src / "config.json").write_text('{\n  "model_type": "qwen3",\n  "hidden_size": 64,,\n}')
    with pytest.raises(ConfigError, match=r"config.json:3:\d+: invalid JSON"):
        load_model(src)


@pytest.mark.parametrize("field, value, message", [
    ("model_type", "llama", "field 'model_type' is 'llama'"),
    ("rope_parameters", {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}, "field 'rope_parameters' has rope_type 'linear'"),
    ("use_sliding_window", True, "field 'use_sliding_window'"),
    ("num_key_value_heads", 3, "multiple of num_key_value_heads"),
])
def test_unsupported_config_fields_are_named(tmp_path, field, value, message):
    src = save_hf_qwen3(tmp_path / "cfg")
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_model(src)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    src = save_hf_qwen3(tmp_path / "src")
    model = load_model(src, dtype=torch.float32)
    out = save_model(model, tmp_path / "out")
    before = load_file(out / "model.safetensors")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_module, "save_file", crash)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "out")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.slow
def test_load_peak_memory_is_about_one_copy_of_the_weights(tmp_path):
    """A ~200 MB fp32 checkpoint loads with well under two copies of extra RSS (meta init + mmap reads)."""
    src = save_hf_qwen3(tmp_path / "big", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                        num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                        tie_word_embeddings=False)
    weight_bytes = (src / "model.safetensors").stat().st_size
    script = (
        "import torch\n"
        "from qforge.engine import load_model\n"
        "from qforge.engine.train.metrics import peak_memory_bytes\n"
        "base = peak_memory_bytes()\n"
        f"model = load_model({str(src)!r}, dtype=torch.float32)\n"
        "print(peak_memory_bytes() - base)\n"
    )
    extra = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert extra < 1.35 * weight_bytes, (extra, weight_bytes)


@pytest.mark.parametrize("vl", [False, True])
def test_kept_vocabulary_export_writes_generation_config_once_with_suppressed_ids(tmp_path, monkeypatch, vl):
    """The export writes generation_config.json once: the source's settings plus the unkept ids; the kept-id file is
    the vocabulary's only file (no second writer re-reading the config)."""
    from qwen3_fixtures import save_hf_qwen3_vl

    from qforge.engine import files
    from qforge.engine.vocab import KEPT_IDS_FILE, VocabMap

    src = (save_hf_qwen3_vl if vl else save_hf_qwen3)(tmp_path / "src")
    generation = {"eos_token_id": [7, 9], "suppress_tokens": [3], "temperature": 0.6}
    (src / "generation_config.json").write_text(json.dumps(generation))
    source = read_source(src)
    vocab = VocabMap.from_ids(list(range(0, source.config.vocab_size, 2)), source.config.vocab_size, [4])
    writes = []
    real_write_text = files.write_text
    monkeypatch.setattr(files, "write_text", lambda path, text: writes.append(path.name) or real_write_text(path, text))
    out = save_model(load_model(source, dtype=torch.float32), tmp_path / "out", source, vocab=vocab)
    assert writes.count("generation_config.json") == 1
    expected = {**generation, "suppress_tokens": sorted({3, 4, *range(1, source.config.vocab_size, 2)})}
    assert json.loads((out / "generation_config.json").read_text()) == expected
    assert VocabMap.load(out / KEPT_IDS_FILE).kept_ids.tolist() == vocab.kept_ids.tolist()
