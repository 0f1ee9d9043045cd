"""Linear layer + KL divergence to a teacher over a (possibly pruned) vocabulary, never materialising the
student's [T, V] logits.

Two teachers, one chunked driver:
- sparse (off-policy distillation): the teacher's top-k log-probabilities per position, stored with the data.
  Forward KL over the top-k, KL(q ‖ p) = Σ_k q_k (log q_k − log p(id_k)), is a soft cross-entropy over
  sparse targets plus a constant, so the row pass needs only the log-sum-exp and K gathered logits; its
  gradient is (Σ_k q_k) · softmax − scatter(q). A CE term on the labels (the KL+CE mix) is one more target
  column, merged into the top-k column when the label is already there.
- dense (on-policy distillation): the teacher's final hidden states and output weight; each chunk computes
  the student's and the teacher's logits over the kept vocabulary side by side (two chunk buffers) and the
  row pass returns forward KL(p_T ‖ p_S) or reverse KL(p_S ‖ p_T) and its gradient w.r.t. the student logits.
  The teacher gets no gradient.

Like `fused_linear_cross_entropy` (same chunking idea, its own code): tokens go in chunks of `rows` × the whole
kept vocabulary sized by `chunk_bytes`; each chunk's row pass overwrites the fp32 logits with the loss
gradient and two matmuls finish grad_hidden and grad_weight in the forward, so the backward only scales them.
Logits, softmax and grad_weight accumulation are fp32 whatever the input dtype.

The row passes exist twice with the same contract: `_sparse_rows_torch` / `_dense_rows_torch` (the CPU
reference, vectorised torch ops) and `_sparse_kl_rows_kernel` / `_dense_kl_rows_kernel` (Triton, one row per
program, online max / sum-exp over vocab blocks).
"""
import torch
import triton
import triton.language as tl

from .dispatch import Launch, ModelShape, use_triton

DEFAULT_CHUNK_BYTES = 256 * 2**20
BLOCK_V = 4096
ROW_KERNEL_WARPS = 8
MAX_TOP_K = 128  # top-k columns per row (+1 for the CE label); the Triton kernel loads them as one block
DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("sum", "mean")


@triton.jit
def _sparse_kl_rows_kernel(LOGITS, stride, IDS, PROBS, K, SCALE, LOSS, V, WITH_GRAD: tl.constexpr,
                           BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row: loss = Σ_k w_k · (lse − logit[id_k]) over ids ≥ 0 (distinct); with WITH_GRAD the row is
    overwritten by scale · ((Σ_k w_k) · softmax − scatter(w))."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    ks = tl.arange(0, BLOCK_K)
    ids = tl.load(IDS + row * K + ks, mask=ks < K, other=-1)
    valid = ids >= 0
    w = tl.load(PROBS + row * K + ks, mask=(ks < K) & valid, other=0.0)
    picked = tl.load(base + ids, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.sum(tl.where(valid, w * (lse - picked), 0.0), axis=0))
    if WITH_GRAD:
        scale = tl.load(SCALE + row)
        softmax_scale = scale * tl.sum(w, axis=0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            tl.store(base + cols, tl.exp(x - lse) * softmax_scale, mask=cols < V)
        tl.debug_barrier()  # the scatter below reads what other threads of this program just wrote
        grad = tl.load(base + ids, mask=valid, other=0.0)
        tl.store(base + ids, grad - scale * w, mask=valid)


@triton.jit
def _dense_kl_rows_kernel(STUDENT, s_stride, TEACHER, t_stride, SCALE, LOSS, V, REVERSE: tl.constexpr,
                          WITH_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row of student logits s and teacher logits t: forward KL(p_t ‖ p_s) or reverse KL(p_s ‖ p_t); with
    WITH_GRAD the student row is overwritten by scale · ∂loss/∂s."""
    row = tl.program_id(0).to(tl.int64)
    s_base = STUDENT + row * s_stride
    t_base = TEACHER + row * t_stride
    s_max = float("-inf")
    s_sum = 0.0
    t_max = float("-inf")
    t_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s = tl.load(s_base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        t = tl.load(t_base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_s = tl.maximum(s_max, tl.max(s, axis=0))
        s_sum = s_sum * tl.exp(s_max - new_s) + tl.sum(tl.exp(s - new_s), axis=0)
        s_max = new_s
        new_t = tl.maximum(t_max, tl.max(t, axis=0))
        t_sum = t_sum * tl.exp(t_max - new_t) + tl.sum(tl.exp(t - new_t), axis=0)
        t_max = new_t
    s_lse = s_max + tl.log(s_sum)
    t_lse = t_max + tl.log(t_sum)
    scale = tl.load(SCALE + row)
    loss = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        log_ps = tl.load(s_base + cols, mask=mask, other=0.0).to(tl.float32) - s_lse
        log_pt = tl.load(t_base + cols, mask=mask, other=0.0).to(tl.float32) - t_lse
        if REVERSE:
            loss += tl.sum(tl.where(mask, tl.exp(log_ps) * (log_ps - log_pt), 0.0), axis=0)
        else:
            p_t = tl.exp(log_pt)
            loss += tl.sum(tl.where(mask, p_t * (log_pt - log_ps), 0.0), axis=0)
            if WITH_GRAD:
                tl.store(s_base + cols, scale * (tl.exp(log_ps) - p_t), mask=mask)
    tl.store(LOSS + row, loss)
    if REVERSE and WITH_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            log_ps = tl.load(s_base + cols, mask=mask, other=0.0).to(tl.float32) - s_lse
            log_pt = tl.load(t_base + cols, mask=mask, other=0.0).to(tl.float32) - t_lse
            tl.store(s_base + cols, scale * tl.exp(log_ps) * (log_ps - log_pt - loss), mask=mask)


def _sparse_rows_triton(logits, ids, probs, scale, with_grad):
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    k = ids.shape[1]
    _sparse_kl_rows_kernel[(logits.shape[0],)](logits, logits.stride(0), ids, probs, k, scale, losses,
                                               logits.shape[1], WITH_GRAD=with_grad, BLOCK_V=BLOCK_V,
                                               BLOCK_K=triton.next_power_of_2(k), num_warps=ROW_KERNEL_WARPS)
    return losses


def _sparse_rows_torch(logits, ids, probs, scale, with_grad):
    """Same contract as the Triton sparse row kernel, in place on fp32 logits [rows, V]; ids [rows, K] (−1 =
    none, distinct per row), probs [rows, K]."""
    valid = ids >= 0
    safe = ids.clamp_min(0)
    w = torch.where(valid, probs, 0.0)
    picked = logits.gather(1, safe)
    row_max = logits.amax(1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    sum_exp = exp.sum(1, keepdim=True)
    lse = row_max + sum_exp.log()
    losses = (w * (lse - picked)).sum(1)
    if with_grad:
        exp.mul_((scale * w.sum(1))[:, None] / sum_exp)
        exp.scatter_add_(1, safe, -scale[:, None] * w)
    return losses


def _dense_rows_triton(student, teacher, scale, reverse, with_grad):
    losses = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
    _dense_kl_rows_kernel[(student.shape[0],)](student, student.stride(0), teacher, teacher.stride(0), scale, losses,
                                               student.shape[1], REVERSE=reverse, WITH_GRAD=with_grad,
                                               BLOCK_V=BLOCK_V, num_warps=ROW_KERNEL_WARPS)
    return losses


def _dense_rows_torch(student, teacher, scale, reverse, with_grad):
    """Same contract as the Triton dense row kernel, in place on fp32 student logits [rows, V]."""
    log_ps = torch.log_softmax(student, dim=1)
    log_pt = torch.log_softmax(teacher, dim=1)
    if reverse:
        p_s = log_ps.exp()
        losses = (p_s * (log_ps - log_pt)).sum(1)
        if with_grad:
            student.copy_(scale[:, None] * p_s * (log_ps - log_pt - losses[:, None]))
    else:
        p_t = log_pt.exp()
        losses = (p_t * (log_pt - log_ps)).sum(1)
        if with_grad:
            student.copy_(scale[:, None] * (log_ps.exp() - p_t))
    return losses


def _chunked_kl_and_grads(hidden, weight, scale, teacher, rows_per_chunk, rows_fn, grad_hidden_needed,
                          grad_weight_needed):
    """Per-token losses [T] and the requested grads of Σ scale · loss w.r.t. hidden and weight.

    `teacher` is ("sparse", ids, probs) or ("dense", teacher_hidden, teacher_weight, reverse)."""
    T, V = hidden.shape[0], weight.shape[0]
    with_grad = grad_hidden_needed or grad_weight_needed
    losses = torch.empty(T, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden_needed else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight_needed else None
    rows = min(rows_per_chunk, T)
    buffer = torch.empty(rows, V, dtype=torch.float32, device=hidden.device)
    teacher_buffer = torch.empty(rows, V, dtype=torch.float32, device=hidden.device) if teacher[0] == "dense" else None

    def project(x, w, out):
        if x.dtype == torch.float32:
            torch.mm(x, w.T, out=out)
        else:
            out.copy_(x @ w.T)

    for start in range(0, T, rows_per_chunk):
        end = min(start + rows_per_chunk, T)
        chunk = hidden[start:end]
        logits = buffer[:end - start]
        project(chunk, weight, logits)
        if teacher[0] == "sparse":
            losses[start:end] = rows_fn(logits, teacher[1][start:end], teacher[2][start:end], scale[start:end],
                                        with_grad)
        else:
            teacher_logits = teacher_buffer[:end - start]
            project(teacher[1][start:end], teacher[2], teacher_logits)
            losses[start:end] = rows_fn(logits, teacher_logits, scale[start:end], teacher[3], with_grad)
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


class _FusedLinearKL(torch.autograd.Function):
    """Inputs are already reduced to the tokens that take part; gradients are finished in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, scale, teacher, rows_per_chunk, rows_fn):
        losses, grad_hidden, grad_weight = _chunked_kl_and_grads(hidden, weight, scale, teacher, rows_per_chunk,
                                                                 rows_fn, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return (losses * scale).sum()

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        if not torch.equal(grad_out, torch.ones_like(grad_out)):
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_out
            grad_weight = None if grad_weight is None else grad_weight * grad_out
        return grad_hidden, grad_weight, None, None, None, None


def _kept_position(ids, vocab_size, vocab_index):
    """Original token ids → row of the kept weight (−1: not kept, or already −1)."""
    if vocab_index is None:
        return torch.where((ids >= 0) & (ids < vocab_size), ids, -1)
    table = torch.full((vocab_size,), -1, dtype=torch.long, device=ids.device)
    table[vocab_index] = torch.arange(len(vocab_index), device=ids.device)
    return torch.where((ids >= 0) & (ids < vocab_size), table[ids.clamp(0, vocab_size - 1)], -1)


def _sparse_targets(target_ids, target_logprobs, labels_kept, ce_weight, renormalize):
    """(ids [n, K'], weights [n, K'], constant [n]) of the KL+CE mix as a soft cross-entropy over sparse
    targets: loss = Σ w·(lse − logit[id]) + constant, constant = (1 − ce)·Σ q·log q."""
    valid = target_ids >= 0
    logq = torch.where(valid, target_logprobs.float(), float("-inf"))
    if renormalize:
        logq = logq - torch.logsumexp(logq, dim=1, keepdim=True).nan_to_num(neginf=0.0)
    q = torch.where(valid, logq.exp(), 0.0)
    constant = (1.0 - ce_weight) * torch.where(valid, q * logq, 0.0).sum(1)
    w = (1.0 - ce_weight) * q
    ids = target_ids
    if ce_weight > 0:
        same = (ids == labels_kept[:, None]) & valid
        w = w + ce_weight * same
        extra = torch.where(same.any(1), -1, labels_kept)
        ids = torch.cat([ids, extra[:, None]], dim=1)
        w = torch.cat([w, torch.where(extra >= 0, ce_weight, 0.0)[:, None]], dim=1)
    return ids.contiguous(), w.contiguous(), constant


def _check_inputs(hidden, weight, labels, target_ids, target_logprobs, teacher_hidden, teacher_weight, direction,
                  ce_weight, loss_weight, reduction, chunk_bytes):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or hidden.dtype != weight.dtype:
        raise ValueError(f"fused_linear_kl: expected hidden [T, H] and weight [V, H] of one dtype, got "
                         f"{hidden.dtype} {tuple(hidden.shape)} and {weight.dtype} {tuple(weight.shape)}")
    T = hidden.shape[0]
    if labels.shape != (T,) or labels.dtype.is_floating_point:
        raise ValueError(f"fused_linear_kl: labels must be integer [T={T}], got {labels.dtype} {tuple(labels.shape)}")
    sparse, dense = target_ids is not None, teacher_hidden is not None
    if sparse == dense or (sparse and target_logprobs is None) or (dense and teacher_weight is None):
        raise ValueError("fused_linear_kl: pass either target_ids + target_logprobs (top-k teacher) or "
                         "teacher_hidden + teacher_weight (full teacher), not both or neither")
    if sparse:
        if target_ids.dim() != 2 or target_ids.shape[0] != T or target_logprobs.shape != target_ids.shape:
            raise ValueError(f"fused_linear_kl: target_ids and target_logprobs must both be [T={T}, K], got "
                             f"{tuple(target_ids.shape)} and {tuple(target_logprobs.shape)}")
        if target_ids.shape[1] > MAX_TOP_K:
            raise ValueError(f"fused_linear_kl: at most {MAX_TOP_K} top-k columns, got {target_ids.shape[1]}")
        if direction != "forward":
            raise ValueError("fused_linear_kl: a top-k teacher gives forward KL only; reverse KL needs "
                             "teacher_hidden + teacher_weight")
    else:
        if teacher_hidden.shape[0] != T or teacher_weight.shape[1] != teacher_hidden.shape[1] or \
                teacher_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"fused_linear_kl: teacher_hidden [T={T}, H'] and teacher_weight [V={weight.shape[0]}, "
                             f"H'] expected, got {tuple(teacher_hidden.shape)} and {tuple(teacher_weight.shape)}")
        if ce_weight:
            raise ValueError("fused_linear_kl: ce_weight mixes CE into the top-k (off-policy) KL only")
    if direction not in DIRECTIONS:
        raise ValueError(f"fused_linear_kl: direction={direction!r}, expected one of {DIRECTIONS}")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"fused_linear_kl: ce_weight must be in [0, 1], got {ce_weight}")
    if loss_weight is not None and loss_weight.shape != (T,):
        raise ValueError(f"fused_linear_kl: loss_weight must be [T={T}], got {tuple(loss_weight.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"fused_linear_kl: reduction={reduction!r}, expected one of {REDUCTIONS}")
    if chunk_bytes <= 0:
        raise ValueError(f"fused_linear_kl: chunk_bytes must be positive, got {chunk_bytes}")


def fused_linear_kl(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    target_ids: torch.Tensor | None = None, target_logprobs: torch.Tensor | None = None,
                    teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                    direction: str = "forward", ce_weight: float = 0.0, renormalize: bool = True,
                    ignore_index: int = -100, loss_weight: torch.Tensor | None = None,
                    vocab_index: torch.Tensor | None = None, reduction: str = "sum",
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES, backend: str = "auto") -> torch.Tensor:
    """Σ_t w_t · loss_t over the positions whose label is not ignore_index, student logits = hidden @
    weight[vocab_index].T, all distributions over the kept vocabulary.

    Top-k teacher (target_ids [T, K] original token ids, −1 = none; target_logprobs [T, K]): loss_t =
    (1 − ce_weight) · KL(q_t ‖ p_t) + ce_weight · CE(p_t, label_t), q_t = exp(target_logprobs) over the kept
    ids, renormalised to sum to 1 when `renormalize`. Full teacher (teacher_hidden [T, H'], teacher_weight
    [V, H']): loss_t = forward KL(p_T ‖ p_S) or reverse KL(p_S ‖ p_T) by `direction`. reduction "sum"
    returns the weighted sum, "mean" divides by Σ w_t. Gradients reach hidden and weight only. fp32 loss.
    """
    _check_inputs(hidden, weight, labels, target_ids, target_logprobs, teacher_hidden, teacher_weight, direction,
                  ce_weight, loss_weight, reduction, chunk_bytes)
    vocab_size = weight.shape[0]
    active = labels != ignore_index
    rows = active.nonzero().squeeze(1)
    token_weight = (torch.ones(labels.shape, dtype=torch.float32, device=labels.device) if loss_weight is None
                    else loss_weight.float())[rows]
    if reduction == "mean":
        token_weight = token_weight / token_weight.sum().clamp_min(torch.finfo(torch.float32).tiny)
    kept_weight = weight if vocab_index is None else weight.index_select(0, vocab_index.to(weight.device))
    hidden = hidden.index_select(0, rows)
    if target_ids is not None:
        labels_kept = _kept_position(labels[rows], vocab_size, vocab_index)
        if ce_weight > 0 and (labels_kept < 0).any():
            bad = labels[rows][labels_kept < 0].unique()[:10].tolist()
            raise ValueError(f"fused_linear_kl: labels outside the kept vocabulary: ids {bad}")
        ids, probs, constant = _sparse_targets(_kept_position(target_ids[rows], vocab_size, vocab_index),
                                               target_logprobs[rows], labels_kept, ce_weight, renormalize)
        on_triton = use_triton(backend, hidden, weight)
        teacher = ("sparse", ids, probs)
        rows_fn = _sparse_rows_triton if on_triton else _sparse_rows_torch
        buffers = 1
    else:
        kept_teacher = teacher_weight if vocab_index is None else teacher_weight.index_select(
            0, vocab_index.to(teacher_weight.device))
        teacher_hidden = teacher_hidden.detach().index_select(0, rows).to(hidden.dtype)
        teacher = ("dense", teacher_hidden, kept_teacher.detach().to(hidden.dtype), direction == "reverse")
        rows_fn = _dense_rows_triton if use_triton(backend, hidden, weight) else _dense_rows_torch
        constant = None
        buffers = 2
    rows_per_chunk = max(1, chunk_bytes // (kept_weight.shape[0] * 4 * buffers))
    loss = _FusedLinearKL.apply(hidden, kept_weight, token_weight, teacher, rows_per_chunk, rows_fn)
    if constant is not None:
        loss = loss + (constant * token_weight).sum()
    return loss


def aot_launches(shape: ModelShape, dtype: str = "bf16"):
    """The row kernels on fp32 logits chunks of the model's vocabulary: top-k (the largest K, with the CE column)
    and full-teacher forward / reverse KL, each without (eval) and with gradients."""
    for with_grad in (False, True):
        yield Launch(_sparse_kl_rows_kernel,
                     {"LOGITS": "*fp32", "stride": shape.vocab, "IDS": "*i64", "PROBS": "*fp32", "K": MAX_TOP_K + 1,
                      "SCALE": "*fp32", "LOSS": "*fp32", "V": shape.vocab},
                     {"WITH_GRAD": with_grad, "BLOCK_V": BLOCK_V, "BLOCK_K": triton.next_power_of_2(MAX_TOP_K + 1)},
                     ROW_KERNEL_WARPS, f"top-{MAX_TOP_K} + CE, {'train' if with_grad else 'eval'}")
        for reverse in (False, True):
            yield Launch(_dense_kl_rows_kernel,
                         {"STUDENT": "*fp32", "s_stride": shape.vocab, "TEACHER": "*fp32", "t_stride": shape.vocab,
                          "SCALE": "*fp32", "LOSS": "*fp32", "V": shape.vocab},
                         {"REVERSE": reverse, "WITH_GRAD": with_grad, "BLOCK_V": BLOCK_V}, ROW_KERNEL_WARPS,
                         f"{'reverse' if reverse else 'forward'} KL, {'train' if with_grad else 'eval'}")
