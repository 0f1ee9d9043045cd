"""Per-token log-probs of packed completions through the fused head vs an fp64 full-logits reference.

The reference is the same model in float64 projecting every position onto the whole head, restricted to the
kept vocabulary by −inf, `log_softmax`, gather: the [T, V] tensor the fused path never builds. Both kernels'
backends (torch, Triton under TRITON_INTERPRET=1), the full vocabulary and both kept-set layouts (masked when at
least half is kept, gathered below), a sampling temperature; values and every parameter's gradient.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from qforge.engine.config import Qwen3Config
from qforge.engine.model import Qwen3
from qforge.engine.train.logps import pack_completions, token_logps
from qforge.engine.vocab import VocabMap
from qforge.kernels.dispatch import interpreter_active
from qwen3_fixtures import TINY_QWEN3

V = TINY_QWEN3["vocab_size"]


def _model():
    config = Qwen3Config(**{k: v for k, v in TINY_QWEN3.items() if k != "max_position_embeddings"})
    model = Qwen3(config)
    model.init_weights(std=0.2, seed=3)  # logits of a few units: a peaked softmax, not a uniform one
    return model


def _reference(model, packed, kept, temperature):
    hidden = Qwen3.hidden(model, packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    logits = F.linear(hidden, model.output_weight) / temperature
    if kept is not None:
        unkept = torch.ones(V, dtype=torch.bool)
        unkept[kept] = False
        logits = logits.masked_fill(unkept, -float("inf"))
    labelled = packed.labels != -100
    logps = torch.zeros(len(packed.labels), dtype=logits.dtype)
    logps[labelled] = logits[labelled].log_softmax(-1).gather(1, packed.labels[labelled, None]).squeeze(1)
    return logps


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kept_count", [None, 400, 100])  # full head; masked (≥ half kept); gathered
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_logps_match_fp64_full_logits(backend, kept_count, temperature):
    assert backend == "torch" or interpreter_active(), "tests/conftest.py sets TRITON_INTERPRET=1 before triton loads"
    g = torch.Generator().manual_seed(0)
    kept = None if kept_count is None else torch.randperm(V, generator=g)[:kept_count].sort().values
    pool = torch.arange(V) if kept is None else kept
    prompts = [pool[torch.randint(len(pool), (n,), generator=g)].tolist() for n in (3, 1, 6)]
    completions = [pool[torch.randint(len(pool), (n,), generator=g)].tolist() for n in (5, 2, 9)]
    packed, positions, sequence = pack_completions(prompts, completions)
    assert torch.equal(packed.labels[positions], torch.tensor(sum(completions, [])))
    assert torch.equal(sequence, torch.tensor([0] * 5 + [1] * 2 + [2] * 9))

    model = _model()
    reference = copy.deepcopy(model).double()
    tables = {}
    if kept is not None:
        vocab_index, target_index = VocabMap.from_ids(kept.tolist(), V).loss_tables(torch.device("cpu"))
        tables = dict(vocab_index=vocab_index, target_index=target_index)
    coefficients = torch.randn(len(packed.labels), generator=g, dtype=torch.float64)

    ours = token_logps(model, packed, temperature=temperature, backend=backend, **tables)
    truth = _reference(reference, packed, kept, temperature)
    assert ours.dtype == torch.float32 and ours.shape == truth.shape
    assert ours[packed.labels == -100].eq(0).all()
    assert (ours.double() - truth).abs().max() < 2e-5
    (ours.double() * coefficients).sum().backward()
    (truth * coefficients).sum().backward()
    truth_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        expected = truth_grads[name].grad
        assert (param.grad.double() - expected).abs().max() < 2e-5 * max(1.0, float(expected.abs().max())), name


def test_pack_completions_errors():
    with pytest.raises(ValueError, match="empty prompt"):
        pack_completions([[]], [[1]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        pack_completions([[1], [2]], [[3]])
    with pytest.raises(ValueError, match="temperature"):
        packed, _, _ = pack_completions([[1]], [[2]])
        token_logps(_model(), packed, temperature=0.0)
