"""Linear layer + cross-entropy over a (possibly pruned) vocabulary without materialising [T, V] logits.

Design: tokens are processed in chunks of `rows` × the full kept vocabulary, where `rows` comes from the
caller's memory budget (`chunk_bytes` of fp32 logits). Per chunk: one matmul makes the logits, a row pass
turns them *in place* into the loss and its gradient (softmax − one-hot, scaled per token), and two more
matmuls add that chunk's share of grad_hidden and grad_weight. So the gradients are finished when the
forward returns and the backward only scales them by the incoming scalar — Liger-Kernel's scheme rather
than Cut Cross-Entropy's recomputation, because it costs three matmuls in total (the same as the naive
path, which must also run them) where recomputation costs four, and on the CPU training path matmul time
dominates. Chunks of tokens × full vocabulary keep every matmul large and let the softmax normalise in one
go; the peak extra memory is one reused chunk buffer of logits, never O(T × V). The default budget
(256 MiB, ~440 tokens at V = 151,936) is large because every CPU op pays a thread-pool round trip: tiny
chunks were measured up to 10× slower on a loaded 2-core machine.

`reduction="none"` is the exception: the per-token upstream gradient is unknown in the forward, so its
backward recomputes the chunks with the upstream gradient folded into the token weights (four matmuls).

`vocab_index` gathers the kept rows once per call (`weight.index_select`, whose backward scatters the
gradient into the kept rows only, so a tied embedding's other rows get nothing from the loss); that copy
and its gradient are the pruned path's only extra O(V' × H) memory.

Precision: logits, softmax, the true-class term and grad_weight accumulation are fp32 whatever the input
dtype (a bf16 input's matmuls run in bf16, each chunk's grad_weight share is added to an fp32 buffer,
never accumulated in bf16). The loss is returned in fp32.

The row pass exists twice with the same contract: `_rows_torch` (the CPU reference, vectorised torch ops)
and `_cross_entropy_rows_kernel` (Triton, one row per program, online max/sum-exp over vocab blocks).
"""
import torch
import triton
import triton.language as tl

from .dispatch import use_triton

DEFAULT_CHUNK_BYTES = 256 * 2**20
BLOCK_V = 4096
ROW_KERNEL_WARPS = 8
REDUCTIONS = ("sum", "mean", "none")


@triton.jit
def _cross_entropy_rows_kernel(LOGITS, stride, TARGETS, SCALE, LOSS, V, z_loss, WITH_GRAD: tl.constexpr,
                               BLOCK_V: tl.constexpr):
    """Per row: loss = lse − logit[target] + z_loss·lse²; with WITH_GRAD the row is overwritten by
    scale · (softmax · (1 + 2·z_loss·lse) − one_hot(target))."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target_logit = tl.load(base + target).to(tl.float32)
    tl.store(LOSS + row, lse - target_logit + z_loss * lse * lse)
    if WITH_GRAD:
        scale = tl.load(SCALE + row)
        softmax_scale = scale * (1.0 + 2.0 * z_loss * lse)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) * softmax_scale
            grad = tl.where(cols == target, grad - scale, grad)
            tl.store(base + cols, grad, mask=cols < V)


def _rows_triton(logits, targets, scale, z_loss, with_grad):
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _cross_entropy_rows_kernel[(logits.shape[0],)](logits, logits.stride(0), targets, scale, losses, logits.shape[1],
                                                   z_loss, WITH_GRAD=with_grad, BLOCK_V=BLOCK_V,
                                                   num_warps=ROW_KERNEL_WARPS)
    return losses


def _rows_torch(logits, targets, scale, z_loss, with_grad):
    """Same contract as the Triton row kernel, in place on fp32 logits [rows, V]."""
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    row_max = logits.amax(1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    sum_exp = exp.sum(1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    losses = lse - target_logit + z_loss * lse * lse
    if with_grad:
        exp.mul_((scale * (1.0 + 2.0 * z_loss * lse))[:, None] / sum_exp)
        exp[torch.arange(len(targets), device=targets.device), targets] -= scale
    return losses


def _chunked_loss_and_grads(hidden, weight, targets, scale, z_loss, rows_per_chunk, rows_fn, grad_hidden_needed,
                            grad_weight_needed):
    """Per-token losses [T] and the requested grads (else None) of sum(scale · loss) w.r.t. hidden, weight."""
    T = hidden.shape[0]
    with_grad = grad_hidden_needed or grad_weight_needed
    losses = torch.empty(T, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden_needed else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight_needed else None
    # one buffer reused by every chunk: a fresh `logits = ...` per chunk would hold two chunks at the rebinding
    logits_buffer = torch.empty(min(rows_per_chunk, T), weight.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, T, rows_per_chunk):
        end = min(start + rows_per_chunk, T)
        chunk = hidden[start:end]
        logits = logits_buffer[:end - start]
        if hidden.dtype == torch.float32:
            torch.mm(chunk, weight.T, out=logits)
        else:
            logits.copy_(chunk @ weight.T)
        losses[start:end] = rows_fn(logits, targets[start:end], scale[start:end], z_loss, with_grad)
        if not with_grad:
            continue
        grad_logits = logits.to(hidden.dtype)
        if grad_hidden_needed:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        if grad_weight_needed and grad_logits.dtype == torch.float32:
            grad_weight.addmm_(grad_logits.T, chunk)
        elif grad_weight_needed:
            grad_weight += (grad_logits.T @ chunk).float()
    return losses, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Inputs are already reduced to valid tokens (targets are row indices of `weight`)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, z_loss, rows_per_chunk, rows_fn, per_token):
        ctx.per_token = per_token
        if per_token:
            ctx.save_for_backward(hidden, weight, targets, scale)
            ctx.settings = (z_loss, rows_per_chunk, rows_fn)
            losses, _, _ = _chunked_loss_and_grads(hidden, weight, targets, scale, z_loss, rows_per_chunk, rows_fn,
                                                   False, False)
            return losses * scale
        losses, grad_hidden, grad_weight = _chunked_loss_and_grads(hidden, weight, targets, scale, z_loss,
                                                                   rows_per_chunk, rows_fn, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return (losses * scale).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.per_token:
            hidden, weight, targets, scale = ctx.saved_tensors
            z_loss, rows_per_chunk, rows_fn = ctx.settings
            _, grad_hidden, grad_weight = _chunked_loss_and_grads(hidden, weight, targets, scale * grad_out, z_loss,
                                                                  rows_per_chunk, rows_fn, *ctx.needs_input_grad[:2])
        else:
            grad_hidden, grad_weight = ctx.saved_tensors
            if not torch.equal(grad_out, torch.ones_like(grad_out)):
                grad_hidden = None if grad_hidden is None else grad_hidden * grad_out
                grad_weight = None if grad_weight is None else grad_weight * grad_out
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _describe(ids: torch.Tensor, limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit].tolist())
    return shown + (", ..." if len(ids) > limit else "")


def _kept_targets(labels, ignore_index, vocab_size, vocab_index, ignore_unkept_labels):
    """Row index into the kept weight for every token, −1 for tokens that take no part."""
    active = labels != ignore_index
    out_of_range = active & ((labels < 0) | (labels >= vocab_size))
    if out_of_range.any():
        bad = labels[out_of_range].unique()
        raise ValueError(f"fused_linear_cross_entropy: {int(out_of_range.sum())} label(s) outside [0, {vocab_size}) "
                         f"and not ignore_index={ignore_index}: ids {_describe(bad)}")
    safe_labels = torch.where(active, labels, 0)
    if vocab_index is None:
        return torch.where(active, safe_labels, -1)
    position = torch.full((vocab_size,), -1, dtype=torch.long, device=labels.device)
    position[vocab_index] = torch.arange(len(vocab_index), device=labels.device)
    targets = torch.where(active, position[safe_labels], -1)
    unkept = active & (targets < 0)
    if unkept.any() and not ignore_unkept_labels:
        bad = labels[unkept].unique()
        raise ValueError(f"fused_linear_cross_entropy: {int(unkept.sum())} label(s) are not in vocab_index: ids "
                         f"{_describe(bad)}; keep those ids in the vocabulary or pass ignore_unkept_labels=True "
                         "to leave those tokens out of the loss")
    return targets


def _check_inputs(hidden, weight, labels, loss_weight, reduction, vocab_index, chunk_bytes):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: expected hidden [T, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if labels.shape != (hidden.shape[0],) or labels.dtype.is_floating_point:
        raise ValueError(f"fused_linear_cross_entropy: labels must be integer [T={hidden.shape[0]}], got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if loss_weight is not None and loss_weight.shape != labels.shape:
        raise ValueError(f"fused_linear_cross_entropy: loss_weight must be [T={hidden.shape[0]}], got "
                         f"{tuple(loss_weight.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"fused_linear_cross_entropy: reduction={reduction!r}, expected one of {REDUCTIONS}")
    if chunk_bytes <= 0:
        raise ValueError(f"fused_linear_cross_entropy: chunk_bytes must be positive, got {chunk_bytes}")
    if vocab_index is not None:
        if vocab_index.dim() != 1 or vocab_index.dtype.is_floating_point or len(vocab_index) == 0:
            raise ValueError("fused_linear_cross_entropy: vocab_index must be a non-empty 1-D integer tensor")
        if vocab_index.min() < 0 or vocab_index.max() >= weight.shape[0]:
            raise ValueError(f"fused_linear_cross_entropy: vocab_index has ids outside [0, {weight.shape[0]})")
        if len(vocab_index.unique()) != len(vocab_index):
            raise ValueError("fused_linear_cross_entropy: vocab_index has repeated ids")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, loss_weight: torch.Tensor | None = None,
                               reduction: str = "sum", z_loss: float = 0.0, vocab_index: torch.Tensor | None = None,
                               ignore_unkept_labels: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                               backend: str = "auto") -> torch.Tensor:
    """Σ_t w_t · (lse_t − logit_t[label_t] + z_loss · lse_t²) with logits = hidden @ weight[vocab_index].T.

    labels are original token ids; tokens labelled ignore_index (or, with ignore_unkept_labels=True, whose
    label is not in vocab_index) take no part. w_t = loss_weight[t] (default 1). reduction "sum" returns the
    weighted sum (exact, for normalising across a whole optimizer step), "mean" divides it by Σ w_t over
    the tokens that take part (0 when there are none), "none" returns the weighted per-token losses [T]
    (0 for tokens left out). chunk_bytes bounds the fp32 logits held at once. Gradients flow to hidden and
    weight (only to the vocab_index rows). The loss is fp32.
    """
    _check_inputs(hidden, weight, labels, loss_weight, reduction, vocab_index, chunk_bytes)
    rows_fn = _rows_triton if use_triton(backend, hidden, weight) else _rows_torch
    targets = _kept_targets(labels, ignore_index, weight.shape[0], vocab_index, ignore_unkept_labels)
    token_weight = torch.ones_like(targets, dtype=torch.float32) if loss_weight is None else loss_weight.float()
    taking_part = targets >= 0
    rows = None if bool(taking_part.all()) else taking_part.nonzero().squeeze(1)
    if rows is not None:
        hidden, targets, token_weight = hidden.index_select(0, rows), targets[rows], token_weight[rows]
    if reduction == "mean":
        token_weight = token_weight / token_weight.sum().clamp_min(torch.finfo(torch.float32).tiny)
    kept_weight = weight if vocab_index is None else weight.index_select(0, vocab_index.to(weight.device))
    rows_per_chunk = max(1, chunk_bytes // (kept_weight.shape[0] * 4))
    loss = _FusedLinearCrossEntropy.apply(hidden, kept_weight, targets, token_weight, float(z_loss), rows_per_chunk,
                                          rows_fn, reduction == "none")
    if reduction != "none" or rows is None:
        return loss
    return torch.zeros(labels.shape, dtype=torch.float32, device=loss.device).index_copy(0, rows, loss)


def aot_configs():
    for with_grad in (False, True):
        yield (_cross_entropy_rows_kernel,
               {"LOGITS": "*fp32", "stride": "i32", "TARGETS": "*i64", "SCALE": "*fp32", "LOSS": "*fp32", "V": "i32",
                "z_loss": "fp32", "WITH_GRAD": "constexpr", "BLOCK_V": "constexpr"},
               {"WITH_GRAD": with_grad, "BLOCK_V": BLOCK_V}, ROW_KERNEL_WARPS)
