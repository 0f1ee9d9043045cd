"""Linear layer + cross-entropy over a (possibly restricted) vocabulary without materialising [T, V] logits.

Design (Liger-Kernel's scheme): tokens are processed in chunks of rows × the whole vocabulary. Per chunk one
matmul writes fp32 logits, a row pass turns them into the loss and its gradient (softmax − one-hot, scaled per
token), and two more matmuls add that chunk's share of grad_hidden and grad_weight. The gradients are finished
when the forward returns; the backward only scales them by the incoming gradient. Three matmuls in total (the
naive loss also runs three), where Cut Cross-Entropy's recomputation runs four. `reduction="none"` is the
exception: its per-token upstream gradient is unknown in the forward, so its backward recomputes the chunks.

Precision: logits, softmax, loss and both gradient accumulators are fp32 whatever the input dtype, and the
gradients stay fp32 until the backward has scaled them, so a bf16 gradient is rounded once (an upstream
gradient ≠ 1, e.g. the trainer's 1/Σw, is applied before that rounding). The row pass normalises as
exp(x − max) / Σ exp(x − max): exp(x − lse) loses lse's rounding error, which grows with the logits' size.

Layouts: on CUDA with bf16 inputs, the logits matmul writes fp32 directly (`mm(..., out_dtype=float32)`), the
row pass writes bf16 gradients into a larger group buffer, and the group's grad_weight share is added by
`addmm(..., out_dtype=float32, out=acc)`: no [V, H] temporary, no bf16 rounding of a share. Groups of
GPU_GRAD_ROWS rows keep that addmm compute-bound (its fp32 read-modify-write of [V, H] costs as much as
~1,200 rows of FLOPs); GPU_LOGIT_ROWS keeps the logits matmul compute-bound. On CPU (and for fp32 inputs) the
gradient is written in place over the fp32 logits and chunks are sized by `chunk_bytes` (tiny chunks were
measured up to 10× slower on a loaded 2-core machine: every op pays a thread-pool round trip).

Vocabulary restriction contract: the caller passes `vocab_index` (sorted kept ids, int64) and `target_index`
(original id → kept position, −1 for unkept ids, length = weight rows), both precomputed once on the weight's
device (engine/vocab.py's VocabMap). Targets mapped to −1 take no part. When at least half the rows are kept,
the matmuls run over the whole head and unkept columns are masked to −inf in the row pass (a byte per column,
`target_index >= 0`, one elementwise op per call): no copy of the kept rows and no gathered gradient, for ≤ 2× the matmul FLOPs (1.28× for the CJK-free set). A smaller kept set is
gathered once per call (`index_select`, its backward scatters into the kept rows only). No host sync is spent
on the vocabulary; the one sync per call is the row compaction that skips unlabelled tokens.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import Launch, ModelShape, use_triton

DEFAULT_CHUNK_BYTES = 256 * 2**20  # CPU: fp32 logits held at once
GPU_LOGIT_ROWS = 512    # ≥ ~300 rows make the logits matmul compute-bound on H100 (W read once per chunk)
GPU_GRAD_ROWS = 2048    # ≥ ~1,200 rows make the fp32 grad_weight addmm compute-bound on H100
DENSE_KEPT_FRACTION = 0.5
BLOCK_V = 4096
ROW_KERNEL_WARPS = 8
REDUCTIONS = ("sum", "mean", "none")


@triton.jit
def _cross_entropy_rows_kernel(LOGITS, logits_stride, GRAD, grad_stride, TARGETS, SCALE, LOSS, KEPT, V, z_loss,
                               WITH_GRAD: tl.constexpr, MASK_UNKEPT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row: loss = (max − logit[target]) + log Σ exp(x − max) + z_loss·lse²; with WITH_GRAD, GRAD's row
    gets scale · (softmax · (1 + 2·z_loss·lse) − one_hot(target)) (GRAD may alias LOGITS). With MASK_UNKEPT,
    columns whose KEPT byte is 0 count as −inf."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * logits_stride
    target = tl.load(TARGETS + row)
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        if MASK_UNKEPT:
            x = tl.where(tl.load(KEPT + cols, mask=cols < V, other=0) != 0, x, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)  # a block of only unkept columns
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        running_max = new_max
    log_sum = tl.log(running_sum)
    lse = running_max + log_sum
    target_logit = tl.load(base + target).to(tl.float32)
    tl.store(LOSS + row, (running_max - target_logit) + log_sum + z_loss * lse * lse)
    if WITH_GRAD:
        scale = tl.load(SCALE + row)
        softmax_scale = scale * (1.0 + 2.0 * z_loss * lse) / running_sum
        grad_base = GRAD + row * grad_stride
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - running_max) * softmax_scale
            if MASK_UNKEPT:
                grad = tl.where(tl.load(KEPT + cols, mask=cols < V, other=0) != 0, grad, 0.0)
            grad = tl.where(cols == target, grad - scale, grad)
            if GRAD.dtype.element_ty == tl.bfloat16:
                grad = _round_to_bfloat16(grad)
            tl.store(grad_base + cols, grad.to(GRAD.dtype.element_ty), mask=cols < V)


@triton.jit
def _round_to_bfloat16(x):
    """fp32 → nearest bf16 (ties to even), still in fp32. The GPU's conversion already rounds so; Triton's
    interpreter truncates, and would make the CPU tests measure a worse kernel than the GPU runs."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def _rows_triton(logits, targets, scale, z_loss, grad, kept_columns):
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    grad_arg = logits if grad is None else grad
    kept = scale if kept_columns is None else kept_columns.view(torch.uint8)  # unused when MASK_UNKEPT is off
    _cross_entropy_rows_kernel[(logits.shape[0],)](
        logits, logits.stride(0), grad_arg, grad_arg.stride(0), targets, scale, losses, kept, logits.shape[1],
        z_loss, WITH_GRAD=grad is not None, MASK_UNKEPT=kept_columns is not None, BLOCK_V=BLOCK_V,
        num_warps=ROW_KERNEL_WARPS)
    return losses


def _rows_torch(logits, targets, scale, z_loss, grad, kept_columns):
    """The Triton row kernel's contract in torch ops; overwrites the fp32 logits [rows, V]."""
    if kept_columns is not None:
        logits.masked_fill_(~kept_columns[None, :], -float("inf"))
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    row_max = logits.amax(1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    sum_exp = exp.sum(1, keepdim=True)
    log_sum = sum_exp.log().squeeze(1)
    lse = row_max.squeeze(1) + log_sum
    losses = (row_max.squeeze(1) - target_logit) + log_sum + z_loss * lse * lse
    if grad is not None:
        exp.mul_((scale * (1.0 + 2.0 * z_loss * lse))[:, None] / sum_exp)
        exp[torch.arange(len(targets), device=targets.device), targets] -= scale
        if grad is not logits:  # the CUDA layout's separate (bf16) gradient rows
            grad.copy_(exp)
    return losses


def _cuda_layout(tensor: torch.Tensor) -> bool:
    """Whether `tensor` takes the CUDA branches: mixed-dtype matmuls (`out_dtype=float32`), on-device checks."""
    return tensor.is_cuda


def _mixed_matmul(out, a, b, accumulate):
    """out (fp32) = / += a @ b for bf16/fp16 a, b, accumulated in fp32 without a temporary on CUDA."""
    if _cuda_layout(a):
        if accumulate:
            return torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    product = a @ b  # CPU has no mixed-dtype matmul: the product is rounded once to the input dtype
    return out.add_(product) if accumulate else out.copy_(product)


def _matmul_into(out, a, b, accumulate=False):
    if a.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    return _mixed_matmul(out, a, b, accumulate)


@dataclass(frozen=True)
class ChunkPlan:
    logit_rows: int    # rows of fp32 logits held at once
    grad_rows: int     # rows whose gradient feeds one grad_hidden / grad_weight matmul (a multiple of logit_rows)
    grad_dtype: torch.dtype  # dtype of the gradient rows fed to those matmuls


def chunk_plan(n_tokens: int, vocab: int, dtype: torch.dtype, cuda_layout: bool,
               chunk_bytes: int | None = None) -> ChunkPlan:
    """Chunk sizes for T = n_tokens scored tokens over `vocab` output rows (see the module docstring)."""
    if chunk_bytes is not None:
        logit_rows = max(1, chunk_bytes // (vocab * 4))
    else:
        logit_rows = GPU_LOGIT_ROWS if cuda_layout else max(1, DEFAULT_CHUNK_BYTES // (vocab * 4))
    logit_rows = max(1, min(logit_rows, n_tokens))
    if not (cuda_layout and dtype != torch.float32):
        return ChunkPlan(logit_rows, logit_rows, torch.float32)
    grad_rows = logit_rows * max(1, GPU_GRAD_ROWS // logit_rows)
    return ChunkPlan(logit_rows, max(1, min(grad_rows, n_tokens)), dtype)


def chunked_head_pass(hidden, weight, plan, need_grad_hidden, need_grad_weight, row_pass):
    """The chunk schedule both fused heads run (this loss and fused_linear_kl): per chunk of `plan.logit_rows`
    rows, fp32 logits = hidden @ weightᵀ into one reused buffer, then `row_pass(logits, start, end, grad)` returns
    the chunk's per-token losses and leaves the gradient of Σ scale · loss w.r.t. the logits in `grad` (None
    without gradients; on the mixed layout the bf16 group buffer's rows, else the logits themselves); per group of
    `plan.grad_rows` rows, one grad_hidden and one fp32-accumulating grad_weight matmul. Returns the losses [T]
    and the fp32 grads (None where not needed)."""
    T, V = hidden.shape[0], weight.shape[0]
    with_grad = need_grad_hidden or need_grad_weight
    mixed = with_grad and plan.grad_dtype != torch.float32
    losses = torch.empty(T, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad_weight else None
    # buffers reused by every chunk: a fresh `logits = ...` per chunk would hold two chunks at the rebinding
    logits_buffer = torch.empty(plan.logit_rows, V, dtype=torch.float32, device=hidden.device)
    grad_buffer = torch.empty(plan.grad_rows, V, dtype=plan.grad_dtype, device=hidden.device) if mixed else None
    group_rows = plan.grad_rows if with_grad else plan.logit_rows
    for group in range(0, T, group_rows):
        group_end = min(group + group_rows, T)
        for start in range(group, group_end, plan.logit_rows):
            end = min(start + plan.logit_rows, group_end)
            logits = logits_buffer[:end - start]
            _matmul_into(logits, hidden[start:end], weight.T)
            grad = None if not with_grad else grad_buffer[start - group:end - group] if mixed else logits
            losses[start:end] = row_pass(logits, start, end, grad)
        if not with_grad:
            continue
        grads = grad_buffer[:group_end - group] if mixed else logits  # CPU layout: a group is one chunk
        chunk = hidden[group:group_end]
        if need_grad_hidden:
            _matmul_into(grad_hidden[group:group_end], grads.to(weight.dtype), weight)
        if need_grad_weight:
            _matmul_into(grad_weight, grads.T, chunk.to(grads.dtype), accumulate=True)
    return losses, grad_hidden, grad_weight


def _chunked_loss_and_grads(hidden, weight, targets, scale, z_loss, kept_columns, plan, rows_fn, need_grad_hidden,
                            need_grad_weight):
    """Per-token losses [T] and the fp32 grads (None where not needed) of Σ scale · loss."""
    def row_pass(logits, start, end, grad):
        return rows_fn(logits, targets[start:end], scale[start:end], z_loss, grad, kept_columns)

    return chunked_head_pass(hidden, weight, plan, need_grad_hidden, need_grad_weight, row_pass)


def _scaled(grad: torch.Tensor | None, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """grad · grad_out rounded once to `dtype` (in place on the fp32 accumulator when dtype is fp32)."""
    if grad is None:
        return None
    if dtype == torch.float32:  # on CPU, skipping ×1 (loss.backward()) costs no device sync
        return grad if not grad_out.is_cuda and bool(grad_out == 1) else grad.mul_(grad_out)
    return torch.mul(grad, grad_out, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Inputs are already reduced to the scored tokens (targets are row indices of `weight`)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, z_loss, kept_columns, plan, rows_fn, per_token, needs_grad):
        ctx.per_token = per_token
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if per_token or not any(needs_grad):  # no gradient work in the forward
            if per_token:
                ctx.save_for_backward(hidden, weight, targets, scale, kept_columns)
                ctx.settings = (z_loss, plan, rows_fn)
            losses, _, _ = _chunked_loss_and_grads(hidden, weight, targets, scale, z_loss, kept_columns, plan,
                                                   rows_fn, False, False)
            return losses * scale if per_token else (losses * scale).sum()
        losses, grad_hidden, grad_weight = _chunked_loss_and_grads(hidden, weight, targets, scale, z_loss,
                                                                   kept_columns, plan, rows_fn, *needs_grad)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.consumed = False
        return (losses * scale).sum()

    @staticmethod
    def backward(ctx, grad_out):
        hidden_dtype, weight_dtype = ctx.dtypes
        if ctx.per_token:
            hidden, weight, targets, scale, kept_columns = ctx.saved_tensors
            z_loss, plan, rows_fn = ctx.settings
            _, grad_hidden, grad_weight = _chunked_loss_and_grads(
                hidden, weight, targets, scale * grad_out, z_loss, kept_columns, plan, rows_fn,
                *ctx.needs_input_grad[:2])
            grad_out = torch.ones((), dtype=torch.float32, device=hidden.device)
        else:
            if ctx.consumed:  # the fp32 gradients were scaled in place by the first backward
                raise RuntimeError("fused_linear_cross_entropy: backward through the same loss twice "
                                   "(retain_graph=True) is not supported; recompute the loss")
            ctx.consumed = True
            grad_hidden, grad_weight = ctx.saved_tensors
        return (_scaled(grad_hidden, grad_out, hidden_dtype), _scaled(grad_weight, grad_out, weight_dtype),
                None, None, None, None, None, None, None, None)


def _check_label_range(labels, active, vocab_size):
    """Labels outside [0, V) other than ignore_index: an error, checked on the device without a host sync."""
    bad = active & ((labels < 0) | (labels >= vocab_size))
    message = (f"fused_linear_cross_entropy: label(s) outside [0, {vocab_size}) that are not ignore_index: "
               "check the tokenizer matches the model")
    if _cuda_layout(labels):
        torch._assert_async(~bad.any(), message)
    elif bool(bad.any()):
        shown = ", ".join(str(i) for i in labels[bad].unique()[:10].tolist())
        raise ValueError(f"{message} (ids {shown})")


def _check_inputs(hidden, weight, labels, loss_weight, reduction, vocab_index, target_index, chunk_bytes):
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
    if chunk_bytes is not None and chunk_bytes <= 0:
        raise ValueError(f"fused_linear_cross_entropy: chunk_bytes must be positive, got {chunk_bytes}")
    if (vocab_index is None) != (target_index is None):
        raise ValueError("fused_linear_cross_entropy: pass vocab_index and target_index together "
                         "(engine/vocab.py's VocabMap: kept_ids and old_to_new)")
    if vocab_index is not None:
        for name, index, length in (("vocab_index", vocab_index, None), ("target_index", target_index,
                                                                          weight.shape[0])):
            if index.dim() != 1 or index.dtype != torch.int64 or index.device != weight.device or (
                    length is not None and len(index) != length) or len(index) == 0:
                raise ValueError(f"fused_linear_cross_entropy: {name} must be a non-empty 1-D int64 tensor on "
                                 f"{weight.device}" + (f" of length {length}" if length else "") +
                                 f", got {index.dtype} {tuple(index.shape)} on {index.device}")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, loss_weight: torch.Tensor | None = None,
                               reduction: str = "sum", z_loss: float = 0.0, vocab_index: torch.Tensor | None = None,
                               target_index: torch.Tensor | None = None, chunk_bytes: int | None = None,
                               backend: str = "auto") -> torch.Tensor:
    """Σ_t w_t · (lse_t − logit_t[label_t] + z_loss · lse_t²) with logits = hidden @ weight[vocab_index].T.

    labels are original token ids; tokens labelled ignore_index, or whose target_index entry is −1, take no
    part (mask or reject unkept labels at data load: the kernel never decides). w_t = loss_weight[t] (default
    1). reduction "sum" returns the weighted sum (exact, for normalising across a whole optimizer step),
    "mean" divides it by Σ w_t over the tokens that take part (0 when there are none; an error when they
    weigh 0 in total), "none" returns the weighted per-token losses [T] (0 for tokens left out). chunk_bytes
    bounds the fp32 logits held at once (default: per device, see chunk_plan). Gradients flow to hidden and
    to the kept rows of weight; none are computed when grad mode is off. The loss is fp32.
    """
    _check_inputs(hidden, weight, labels, loss_weight, reduction, vocab_index, target_index, chunk_bytes)
    rows_fn = _rows_triton if use_triton(backend, hidden, weight) else _rows_torch
    vocab_size = weight.shape[0]
    active = labels != ignore_index
    _check_label_range(labels, active, vocab_size)
    labels = labels.long().masked_fill(~active, 0)
    dense = vocab_index is None or 2 * len(vocab_index) >= vocab_size  # sizes only: no sync
    kept_columns = None
    if vocab_index is None:
        targets = labels.masked_fill(~active, -1)
    else:
        position = target_index[labels]
        kept = active & (position >= 0)
        targets = (labels if dense else position).masked_fill(~kept, -1)
        if dense and len(vocab_index) < vocab_size:  # 1 byte per column for the row pass (target_index has 8)
            kept_columns = target_index >= 0
    rows = (targets >= 0).nonzero().squeeze(1)  # the one host sync: unlabelled tokens cost no FLOPs
    token_weight = torch.ones(labels.shape, dtype=torch.float32, device=labels.device) if loss_weight is None \
        else loss_weight.float()
    compacted = len(rows) < len(labels)
    if compacted:
        hidden, targets, token_weight = hidden.index_select(0, rows), targets[rows], token_weight[rows]
    if reduction == "mean" and len(rows):
        total = token_weight.sum()
        if float(total) == 0.0:
            raise ValueError(f"fused_linear_cross_entropy: reduction='mean' over {len(rows)} token(s) whose "
                             "loss_weight sums to 0: the mean is undefined; use reduction='sum'")
        token_weight = token_weight / total
    kept_weight = weight if dense else weight.index_select(0, vocab_index)
    needs_grad = (torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    plan = chunk_plan(max(1, len(rows)), kept_weight.shape[0], hidden.dtype, _cuda_layout(hidden), chunk_bytes)
    loss = _FusedLinearCrossEntropy.apply(hidden, kept_weight, targets, token_weight, float(z_loss), kept_columns,
                                          plan, rows_fn, reduction == "none", needs_grad)
    if reduction != "none" or not compacted:
        return loss
    return torch.zeros(labels.shape, dtype=torch.float32, device=loss.device).index_copy(0, rows, loss)


def aot_launches(shape: ModelShape, dtype: str = "bf16"):
    """The row kernel on the CUDA layout: fp32 logits chunks, gradient rows in the input dtype; without
    gradients (eval), with them, and with the unkept-column mask of a restricted vocabulary."""
    rows = min(GPU_LOGIT_ROWS, shape.tokens)
    for with_grad, mask, what in ((False, False, "eval"), (True, False, "train"), (True, True, "train, masked vocab")):
        yield Launch(_cross_entropy_rows_kernel,
                     {"LOGITS": "*fp32", "logits_stride": shape.vocab, "GRAD": f"*{dtype}",
                      "grad_stride": shape.vocab, "TARGETS": "*i64", "SCALE": "*fp32", "LOSS": "*fp32",
                      "KEPT": "*u8", "V": shape.vocab, "z_loss": 0.0},
                     {"WITH_GRAD": with_grad, "MASK_UNKEPT": mask, "BLOCK_V": BLOCK_V}, ROW_KERNEL_WARPS,
                     f"{what}, {rows} rows/chunk")
