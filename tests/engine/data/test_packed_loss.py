"""The packed loss of the model equals HF transformers' per-sequence losses (fp32), and so do the gradients."""
import numpy as np
import pytest
import torch
from qwen3_fixtures import TINY_QWEN3, save_hf_qwen3

from qforge.engine import load_model
from qforge.engine.data import IGNORE_INDEX, pack
from qforge.engine.data.example import make_example
from qforge.engine.model import hf_key

def random_examples(count: int, seed: int = 0):
    """Sequences with a prompt part and one or two supervised stretches."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        length = int(rng.integers(6, 48))
        ids = rng.integers(0, TINY_QWEN3["vocab_size"], length)
        supervised = np.zeros(length, dtype=bool)
        supervised[rng.integers(1, length - 2):] = True
        supervised[rng.integers(1, length):][:3] = False
        examples.append(make_example(ids, supervised))
    return examples


@pytest.mark.parametrize("tied, weighting", [(True, "sample"), (False, "sqrt")])
def test_packed_loss_and_grads_equal_sum_of_hf_per_sequence_losses(tmp_path, tied, weighting):
    transformers = pytest.importorskip("transformers")
    path = save_hf_qwen3(tmp_path / "ckpt", seed=3, dtype=torch.float32, tie_word_embeddings=tied)
    examples = random_examples(9)

    ours = load_model(path, dtype=torch.float32)
    batches = pack(examples, max_tokens=100, seed=5, loss_weighting=weighting)
    assert len(batches) > 1 and sum(b.num_sequences for b in batches) == len(examples)
    packed = sum(ours.loss(batch) for batch in batches)
    packed.backward()

    hf = transformers.Qwen3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    expected = 0.0
    for example in examples:
        # HF's loss is the mean CE over the shifted supervised positions; our weights are constant per sample:
        # 1/n ("sample") or 1/sqrt(n) ("sqrt") for its n supervised tokens
        targets = example.labels[1:] != IGNORE_INDEX
        weight = {"sample": 1 / example.num_loss_tokens, "sqrt": example.num_loss_tokens ** -0.5}[weighting]
        labels = torch.from_numpy(example.labels.astype(np.int64))[None]
        loss = hf(input_ids=torch.from_numpy(example.input_ids.astype(np.int64))[None], labels=labels).loss
        expected = expected + loss * weight * int(targets.sum())
    expected.backward()

    torch.testing.assert_close(packed, expected.detach(), rtol=1e-5, atol=1e-5)
    hf_params = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, hf_params[hf_key(name)].grad, rtol=1e-4, atol=1e-5, msg=name)
