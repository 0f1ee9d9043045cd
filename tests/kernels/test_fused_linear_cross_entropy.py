import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff

from qforge.kernels import fused_linear_cross_entropy

IGNORE = -100
T, H, V = 33, 48, 300  # odd sizes: V not a multiple of any block, H not a power of two


@pytest.fixture
def small_vocab_blocks(monkeypatch):
    """Shrinks the Triton row kernel's vocab block so V=300 spans three blocks (the last one partial)."""
    import sys
    monkeypatch.setattr(sys.modules["qforge.kernels.fused_linear_cross_entropy"], "BLOCK_V", 128)


def naive_loss(hidden, weight, labels, *, loss_weight=None, reduction="sum", z_loss=0.0):
    """The oracle: full logits + F.cross_entropy (+ z_loss · logsumexp²), weighted per token."""
    logits = (hidden @ weight.T).float() if hidden.dtype != torch.float64 else hidden @ weight.T
    active = labels != IGNORE
    per_token = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE)
    per_token = per_token + z_loss * logits.logsumexp(-1).pow(2) * active
    token_weight = torch.ones_like(per_token) if loss_weight is None else loss_weight.to(per_token.dtype)
    per_token = per_token * token_weight
    if reduction == "none":
        return per_token
    if reduction == "mean":
        return per_token.sum() / (token_weight * active).sum()
    return per_token.sum()


def make_inputs(dtype=torch.float32, seed=0, n_tokens=T, vocab=V):
    torch.manual_seed(seed)
    hidden = torch.randn(n_tokens, H, dtype=dtype, requires_grad=True)
    weight = (0.5 * torch.randn(vocab, H)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n_tokens,))
    labels[3:9] = IGNORE  # an ignored run, e.g. a prompt
    labels[-1] = IGNORE
    return hidden, weight, labels


def grads(loss, inputs, grad_out=None):
    return torch.autograd.grad(loss, inputs, grad_out)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_matches_naive_with_weights_and_z_loss(backend, reduction, triton_interpreter, small_vocab_blocks):
    hidden, weight, labels = make_inputs()
    loss_weight = torch.rand(T) + 0.1
    kwargs = dict(loss_weight=loss_weight, reduction=reduction, z_loss=1e-3)
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend=backend, chunk_bytes=7 * V * 4, **kwargs)
    expected = naive_loss(hidden, weight, labels, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    assert max_abs_diff(loss, expected) < 1e-4 * max(1.0, expected.abs().max().item())
    grad_out = torch.randn_like(expected) if reduction == "none" else torch.tensor(2.5)
    for got, ref in zip(grads(loss, (hidden, weight), grad_out), grads(expected, (hidden, weight), grad_out)):
        assert max_abs_diff(got, ref) < 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_logits_stay_finite(backend, triton_interpreter, small_vocab_blocks):
    """Logits in the thousands, growing along the vocab so later blocks raise the running max."""
    hidden, weight, labels = make_inputs()
    with torch.no_grad():
        weight.mul_(torch.linspace(1, 200, V)[:, None])
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend=backend)
    expected = naive_loss(hidden, weight, labels)
    assert torch.isfinite(loss) and max_abs_diff(loss, expected) < 1e-5 * expected.item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_single_token_and_one_row_chunks(backend, triton_interpreter):
    hidden, weight, labels = make_inputs(n_tokens=1)
    labels[0] = 7
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend=backend, chunk_bytes=1)
    expected = naive_loss(hidden, weight, labels)
    assert max_abs_diff(loss, expected) < 1e-5
    for got, ref in zip(grads(loss, (hidden, weight)), grads(expected, (hidden, weight))):
        assert max_abs_diff(got, ref) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_all_tokens_ignored_gives_zero_loss_and_grads(backend, reduction, triton_interpreter):
    hidden, weight, labels = make_inputs()
    labels[:] = IGNORE
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    grad_out = torch.ones_like(loss)
    for grad in grads(loss, (hidden, weight), grad_out):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_index_with_tied_embedding(backend, triton_interpreter):
    """Labels are original ids; the loss sees only kept rows; gradient reaches only kept rows of the shared
    parameter, and adds to the embedding's own gradient."""
    hidden, _, labels = make_inputs()
    embedding = torch.nn.Embedding(V, H)
    kept = torch.tensor(sorted(set(range(0, V, 3)) | set(labels[labels != IGNORE].tolist())))
    input_ids = torch.randint(0, V, (5,))
    loss = fused_linear_cross_entropy(hidden, embedding.weight, labels, vocab_index=kept, backend=backend)
    (loss + embedding(input_ids).sum()).backward()

    weight = embedding.weight.detach().clone().requires_grad_()
    position = torch.full((V,), IGNORE)
    position[kept] = torch.arange(len(kept))
    kept_labels = torch.where(labels == IGNORE, IGNORE, position[labels.clamp_min(0)])
    expected = naive_loss(hidden, weight[kept], kept_labels) + F.embedding(input_ids, weight).sum()
    grad_hidden_expected, grad_weight_expected = grads(expected, (hidden, weight))
    assert max_abs_diff(loss + F.embedding(input_ids, weight).sum(), expected) < 1e-3
    assert max_abs_diff(hidden.grad, grad_hidden_expected) < 1e-5
    assert max_abs_diff(embedding.weight.grad, grad_weight_expected) < 1e-5
    unkept = torch.ones(V, dtype=torch.bool)
    unkept[kept] = False
    unkept[input_ids] = False
    assert torch.equal(embedding.weight.grad[unkept], torch.zeros_like(embedding.weight.grad[unkept]))


def test_label_outside_vocab_index_is_an_error_naming_the_ids():
    hidden, weight, labels = make_inputs()
    labels[0], labels[1], labels[2] = 5, 11, 5
    kept = torch.tensor([i for i in range(V) if i not in (5, 11)])
    with pytest.raises(ValueError, match=r"3 label\(s\) are not in vocab_index: ids 5, 11;.*ignore_unkept_labels"):
        fused_linear_cross_entropy(hidden, weight, labels, vocab_index=kept)


def test_ignore_unkept_labels_leaves_those_tokens_out():
    hidden, weight, labels = make_inputs()
    labels[0], labels[1] = 5, 11
    kept = torch.tensor([i for i in range(V) if i not in (5, 11)])
    loss = fused_linear_cross_entropy(hidden, weight, labels, vocab_index=kept, ignore_unkept_labels=True,
                                      reduction="none")
    without = labels.clone()
    without[:2] = IGNORE
    expected = fused_linear_cross_entropy(hidden, weight, without, vocab_index=kept, reduction="none")
    assert loss[:2].tolist() == [0.0, 0.0] and torch.equal(loss, expected)


def test_label_out_of_range_is_an_error():
    hidden, weight, labels = make_inputs()
    labels[4] = V
    with pytest.raises(ValueError, match=rf"1 label\(s\) outside \[0, {V}\).*ids {V}"):
        fused_linear_cross_entropy(hidden, weight, labels)


def test_bad_reduction_and_chunk_bytes_are_errors():
    hidden, weight, labels = make_inputs()
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="chunk_bytes"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_bytes=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_error_is_no_worse_than_naive_bf16(backend, triton_interpreter):
    """Cut Cross-Entropy's convention: against an fp64 truth, qforge's bf16 error ≤ naive bf16 error + tol."""
    hidden, weight, labels = make_inputs(dtype=torch.bfloat16)
    truth_inputs = (hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_())
    truth = naive_loss(*truth_inputs, labels, z_loss=1e-3)
    truth_grads = grads(truth, truth_inputs)
    naive = naive_loss(hidden, weight, labels, z_loss=1e-3)
    ours = fused_linear_cross_entropy(hidden, weight, labels, z_loss=1e-3, backend=backend, chunk_bytes=7 * V * 4)
    assert abs(ours.item() - truth.item()) <= abs(naive.item() - truth.item()) + 1e-3 * truth.abs().item()
    for got, baseline, true in zip(grads(ours, (hidden, weight)), grads(naive, (hidden, weight)), truth_grads):
        assert max_abs_diff(got, true) <= max_abs_diff(baseline, true) + 2e-3 * true.abs().max().item()


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_gradient_only_for_inputs_that_require_it(reduction, frozen):
    hidden, weight, labels = make_inputs()
    trainable = weight if frozen == "hidden" else hidden
    (hidden if frozen == "hidden" else weight).requires_grad_(False)
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction).sum()
    expected = naive_loss(hidden, weight, labels)
    assert max_abs_diff(grads(loss, (trainable,))[0], grads(expected, (trainable,))[0]) < 1e-5


def test_forward_without_grad_returns_the_loss():
    hidden, weight, labels = make_inputs()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="mean")
    assert max_abs_diff(loss, naive_loss(hidden, weight, labels, reduction="mean")) < 1e-5
