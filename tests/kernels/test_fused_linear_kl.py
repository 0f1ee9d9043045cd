import subprocess
import sys

import pytest
import torch
from conftest import max_abs_diff

from qforge.kernels.fused_linear_kl import fused_linear_kl

IGNORE = -100
T, H, V, K = 29, 40, 300, 5  # odd sizes: V spans several (shrunk) vocab blocks, the last one partial


@pytest.fixture
def small_vocab_blocks(monkeypatch):
    import sys
    monkeypatch.setattr(sys.modules["qforge.kernels.fused_linear_kl"], "BLOCK_V", 128)


def make_inputs(seed=0, n=T, vocab=V, k=K):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(vocab, H, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[2:6] = IGNORE
    teacher_logits = 2 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    top = teacher_logits.log_softmax(-1).topk(k, dim=-1)
    ids, logprobs = top.indices.clone(), top.values.float()
    ids[0, -2:] = -1  # fewer than k candidates on one row
    labels[1] = ids[1, 0]  # the label among the teacher's top-k (merged column) ...
    return hidden, weight, labels, ids, logprobs  # ... and elsewhere usually not (an extra column)


def truth_sparse(hidden, weight, labels, ids, logprobs, ce_weight, loss_weight=None, vocab_index=None):
    """fp64 closed form: full logits, top-k teacher renormalised over the kept ids, KL + CE mix."""
    w = weight.double() if vocab_index is None else weight.double()[vocab_index]
    logp = (hidden.double() @ w.T).log_softmax(-1)
    table = torch.full((weight.shape[0],), -1, dtype=torch.long)
    table[torch.arange(weight.shape[0]) if vocab_index is None else vocab_index] = torch.arange(w.shape[0])
    total = 0.0
    for t in range(len(labels)):
        if labels[t] == IGNORE:
            continue
        kept = [(table[i], lp) for i, lp in zip(ids[t].tolist(), logprobs[t].double().tolist())
                if i >= 0 and table[i] >= 0]
        lq = torch.tensor([lp for _, lp in kept], dtype=torch.float64)
        lq = lq - lq.logsumexp(0)
        kl = sum(q * (l - logp[t, j]) for (j, _), q, l in zip(kept, lq.exp(), lq))
        ce = -logp[t, table[labels[t]]]
        scale = 1.0 if loss_weight is None else float(loss_weight[t])
        total = total + scale * ((1 - ce_weight) * kl + ce_weight * ce)
    return total


def truth_dense(hidden, weight, labels, teacher_hidden, teacher_weight, direction, vocab_index=None):
    w, tw = weight.double(), teacher_weight.double()
    if vocab_index is not None:
        w, tw = w[vocab_index], tw[vocab_index]
    active = labels != IGNORE
    log_ps = (hidden.double() @ w.T).log_softmax(-1)[active]
    log_pt = (teacher_hidden.double() @ tw.T).log_softmax(-1)[active]
    if direction == "forward":
        return (log_pt.exp() * (log_pt - log_ps)).sum()
    return (log_ps.exp() * (log_ps - log_pt)).sum()


def check(loss, expected, inputs, rtol_loss=1e-5, rtol_grad=1e-5):
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) < rtol_loss * max(1.0, abs(expected.item()))
    grad_out = torch.tensor(1.7)
    got = torch.autograd.grad(loss, inputs, grad_out)
    ref = torch.autograd.grad(expected, inputs, grad_out.double())
    for g, r in zip(got, ref):
        assert max_abs_diff(g, r) < rtol_grad * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_top_k_forward_kl_and_ce_mix_match_fp64_truth(backend, ce_weight, triton_interpreter, small_vocab_blocks):
    hidden, weight, labels, ids, logprobs = make_inputs()
    loss_weight = torch.rand(T) + 0.5
    loss = fused_linear_kl(hidden, weight, labels, target_ids=ids, target_logprobs=logprobs, ce_weight=ce_weight,
                           loss_weight=loss_weight, backend=backend, chunk_bytes=6 * V * 4)
    expected = truth_sparse(hidden, weight, labels, ids, logprobs, ce_weight, loss_weight)
    check(loss, expected, (hidden, weight))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_full_teacher_forward_and_reverse_kl_match_fp64_truth(backend, direction, triton_interpreter,
                                                              small_vocab_blocks):
    hidden, weight, labels, _, _ = make_inputs()
    g = torch.Generator().manual_seed(1)
    teacher_hidden, teacher_weight = torch.randn(T, 24, generator=g), torch.randn(V, 24, generator=g)
    loss = fused_linear_kl(hidden, weight, labels, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                           direction=direction, backend=backend, chunk_bytes=5 * V * 8)
    check(loss, truth_dense(hidden, weight, labels, teacher_hidden, teacher_weight, direction), (hidden, weight))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pruned_vocabulary_and_tied_rows(backend, triton_interpreter, small_vocab_blocks):
    """Over a kept vocabulary: teacher ids outside it are dropped (the rest renormalised); only kept rows of
    the weight get a gradient; the mean divides by Σ w."""
    hidden, weight, labels, ids, logprobs = make_inputs(seed=3)
    vocab_index = torch.unique(torch.cat([ids[ids >= 0][::2], labels[labels != IGNORE]]))
    loss = fused_linear_kl(hidden, weight, labels, target_ids=ids, target_logprobs=logprobs, ce_weight=0.5,
                           vocab_index=vocab_index, reduction="mean", backend=backend, chunk_bytes=4 * V * 4)
    n = int((labels != IGNORE).sum())
    expected = truth_sparse(hidden, weight, labels, ids, logprobs, 0.5, vocab_index=vocab_index) / n
    check(loss, expected, (hidden, weight))
    grad_weight, = torch.autograd.grad(fused_linear_kl(hidden, weight, labels, target_ids=ids, target_logprobs=logprobs,
                                                       vocab_index=vocab_index, backend=backend), weight)
    unkept = torch.ones(V, dtype=torch.bool)
    unkept[vocab_index] = False
    assert grad_weight[unkept].abs().max() == 0 and grad_weight[~unkept].abs().max() > 0


def test_teacher_equal_to_student_gives_zero_kl_and_gradient():
    hidden, weight, labels, _, _ = make_inputs()
    for direction in ("forward", "reverse"):
        loss = fused_linear_kl(hidden, weight, labels, teacher_hidden=hidden.detach(), teacher_weight=weight.detach(),
                               direction=direction)
        grad_hidden, = torch.autograd.grad(loss, hidden)
        assert abs(loss.item()) < 1e-5 and grad_hidden.abs().max() < 1e-5


def test_bad_inputs_are_one_line_errors():
    hidden, weight, labels, ids, logprobs = make_inputs()
    with pytest.raises(ValueError, match="either target_ids"):
        fused_linear_kl(hidden, weight, labels)
    with pytest.raises(ValueError, match="forward KL only"):
        fused_linear_kl(hidden, weight, labels, target_ids=ids, target_logprobs=logprobs, direction="reverse")
    with pytest.raises(ValueError, match=r"\[T=29, K\]"):
        fused_linear_kl(hidden, weight, labels, target_ids=ids[:-1], target_logprobs=logprobs[:-1])


MEMORY_CASE = r"""
import sys, torch
from qforge.engine.train.metrics import peak_memory_bytes
from qforge.kernels.fused_linear_kl import fused_linear_kl
T, H, V, K = 1024, 128, 151936, 20
torch.manual_seed(0)
hidden = torch.empty(T, H).normal_().requires_grad_()
weight = torch.empty(V, H).normal_(0, 0.02).requires_grad_()
labels = torch.randint(0, V, (T,))
ids = torch.randint(0, V, (T, K))
logprobs = torch.randn(T, K).log_softmax(-1)
baseline = peak_memory_bytes()
if sys.argv[1] == "naive":
    logp = (hidden @ weight.T).log_softmax(-1)
    logq = logprobs.double().float()
    (logq.exp() * (logq - logp.gather(1, ids))).sum().backward()
else:
    fused_linear_kl(hidden, weight, labels, target_ids=ids, target_logprobs=logprobs,
                    chunk_bytes=32 * 2**20).backward()
print(peak_memory_bytes() - baseline - hidden.grad.nbytes - weight.grad.nbytes)
"""


@pytest.mark.slow
def test_memory_is_under_a_tenth_of_the_naive_logits_path_at_qwen3_vocabulary():
    """Peak extra memory (RSS high-water mark over the inputs, minus the gradients both paths return) of the
    fused top-k KL, forward + backward, vs the naive path (full logits + log_softmax) at V = 151,936."""
    peaks = {impl: int(subprocess.run([sys.executable, "-c", MEMORY_CASE, impl], capture_output=True, text=True,
                                      timeout=600, check=True).stdout.split()[-1]) for impl in ("naive", "fused")}
    print(peaks)
    assert peaks["fused"] * 10 <= peaks["naive"], peaks
