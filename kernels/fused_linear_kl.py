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

On the cross-entropy kernel's schedule and precision (its `chunk_plan`, `_matmul_into`, `_scaled`): chunks of
rows × the whole kept vocabulary; each chunk's logits are fp32 (on CUDA written by `mm(..., out_dtype=float32)`
from bf16 operands, the teacher's too), the row pass overwrites the student's with the loss gradient, and
grad_hidden / grad_weight are finished in the forward (bf16 on CUDA: gradient rows gathered into a bf16 group
buffer, grad_weight accumulated in fp32 by `addmm(..., out_dtype=float32)`, no [V, H] temporary per chunk), so
the backward only scales them and rounds once. Without grad mode (or requires_grad) no gradient work is done.

The row passes exist twice with the same contract: `_sparse_rows_torch` / `_dense_rows_torch` (the CPU
reference, vectorised torch ops) and `_sparse_kl_rows_kernel` / `_dense_kl_rows_kernel` (Triton, one row per
program, online max / sum-exp over vocab blocks).
"""
import importlib

import torch
import triton
import triton.language as tl

from .dispatch import Launch, ModelShape, use_triton

# the module (the package re-exports its function under the same name): chunk plan, mixed-dtype matmuls, rounding
_ce = importlib.import_module(f"{__package__}.fused_linear_cross_entropy")

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


def _chunked_kl_and_grads(hidden, weight, scale, teacher, plan, rows_fn, need_grad_hidden, need_grad_weight):
    """Per-token losses [T] and the fp32 grads (None where not needed) of Σ scale · loss, on the cross-entropy
    kernel's chunk schedule (`_ce.chunked_head_pass`). The KL row pass writes fp32 gradients over the logits; on
    the mixed layout (bf16 inputs on CUDA) they are then copied into the group's bf16 buffer, rounded once.

    `teacher` is ("sparse", ids, probs) or ("dense", teacher_hidden, teacher_weight, reverse)."""
    teacher_buffer = torch.empty(plan.logit_rows, weight.shape[0], dtype=torch.float32, device=hidden.device) \
        if teacher[0] == "dense" else None

    def row_pass(logits, start, end, grad):
        with_grad = grad is not None
        if teacher[0] == "sparse":
            losses = rows_fn(logits, teacher[1][start:end], teacher[2][start:end], scale[start:end], with_grad)
        else:
            teacher_logits = teacher_buffer[:end - start]
            _ce._matmul_into(teacher_logits, teacher[1][start:end], teacher[2].T)
            losses = rows_fn(logits, teacher_logits, scale[start:end], teacher[3], with_grad)
        if with_grad and grad is not logits:
            grad.copy_(logits)
        return losses

    return _ce.chunked_head_pass(hidden, weight, plan, need_grad_hidden, need_grad_weight, row_pass)


class _FusedLinearKL(torch.autograd.Function):
    """Inputs are already reduced to the tokens that take part; gradients are finished in the forward (fp32,
    rounded once to the input dtype after the backward's scaling), and none are computed when `needs_grad`
    (grad mode and requires_grad, decided by the caller: inside forward, needs_input_grad ignores grad mode)
    is all False."""

    @staticmethod
    def forward(ctx, hidden, weight, scale, teacher, plan, rows_fn, needs_grad):
        ctx.dtypes = (hidden.dtype, weight.dtype)
        losses, grad_hidden, grad_weight = _chunked_kl_and_grads(hidden, weight, scale, teacher, plan, rows_fn,
                                                                 *needs_grad)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.consumed = False
        return (losses * scale).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.consumed:  # the fp32 gradients were scaled in place by the first backward
            raise RuntimeError("fused_linear_kl: backward through the same loss twice (retain_graph=True) is not "
                               "supported; recompute the loss")
        ctx.consumed = True
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (_ce._scaled(grad_hidden, grad_out, hidden_dtype), _ce._scaled(grad_weight, grad_out, weight_dtype),
                None, None, None, None, None)


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
    if chunk_bytes is not None and chunk_bytes <= 0:
        raise ValueError(f"fused_linear_kl: chunk_bytes must be positive, got {chunk_bytes}")


def fused_linear_kl(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    target_ids: torch.Tensor | None = None, target_logprobs: torch.Tensor | None = None,
                    teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                    direction: str = "forward", ce_weight: float = 0.0, renormalize: bool = True,
                    ignore_index: int = -100, loss_weight: torch.Tensor | None = None,
                    vocab_index: torch.Tensor | None = None, reduction: str = "sum",
                    chunk_bytes: int | None = None, backend: str = "auto") -> torch.Tensor:
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
    needs_grad = (torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    plan = _ce.chunk_plan(max(1, len(rows)), kept_weight.shape[0], hidden.dtype, _ce._cuda_layout(hidden),
                          None if chunk_bytes is None else max(1, chunk_bytes // buffers))
    loss = _FusedLinearKL.apply(hidden, kept_weight, token_weight, teacher, plan, rows_fn, needs_grad)
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
