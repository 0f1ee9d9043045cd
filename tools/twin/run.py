"""One optimizer step of the trainer's own code at real shapes on fake CUDA tensors over a fake process group.

What runs is qforge's: `meta_model` + `shard_model` (FSDP2, one unit per block), `build_optimizer` (fused
AdamW, or bf16 moments: `optim_state_dtype`), `train_step` (packed micro-batches, grad accumulation, the fused
loss) and `optimizer_step` (global clip + AdamW); or, with `objective="dpo"`, `DPO.train_step` over packed preference pairs,
its frozen bf16 reference built and sharded as `DPO.prepare` builds it ("live") or its log-probs a host tensor
("cached"); or distillation: "distill-off-policy" (`OffPolicyDistill`'s loss, the fused top-k KL over stored
teacher log-probs: no teacher in memory while training) and "distill-on-policy" (`OnPolicyDistill`'s loss on
sampled sequences, the frozen bf16 teacher sharded as `load_teacher` builds it scoring every micro-batch; the
sampling itself, qforge's `generate`, is not traced); or "grpo", `GRPO.train_step` on a packed rollout micro-batch
(grpo.py: the rollout's memory is a closed form). Qwen3-MoE models run the same step (models.py). The twin supplies the fake devices (fake_cuda), the CUDA-only libraries' contract stand-ins
(contracts), and observers: FSDPMemTracker (memory by category), Roofline (FLOPs/bytes), HostSyncs.
One step is measured, after AdamW's state has been created (a first step leaves it alive through every later
step's forward and backward).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import numpy as np

from qforge.engine.data.example import Example
from qforge.engine.data.packing import PackedBatch
from qforge.engine.data.preference import PreferenceBatch, PreferencePair
from qforge.engine.train.build import freeze, frozen_dtype, meta_model
from qforge.engine.train.config import OptimSettings
from qforge.engine.vocab import VocabMap
from qforge.engine.data.distill import DistillBatch
from qforge.engine.train.distill import OffPolicyDistill, OnPolicyDistill, teacher_score
from qforge.engine.train.dpo import DPO, sequence_logps
from qforge.engine.train.loop import optimizer_step, precision_policy
from qforge.engine.model import bind_forward_method
from qforge.engine.train.metrics import training_flops
from qforge.engine.train.sft import loss_tables, train_step
from qforge.engine.train.optim import build_optimizer
from qforge.engine.train.parallel import Dist, shard_model

from .collectives import Collectives, check_sequences, volume
from .contracts import attention_standins, triton_launch_standins
from .fake_cuda import FakeDeviceFunctions, in_sharding_propagation, mark_sharding_propagation, route_cuda_paths
from .gpus import GPUS
from .grpo import grpo_lengths, grpo_objective, prepare_grpo, rollout_memory
from .models import resolve_config
from .roofline import Roofline
from .syncs import HostSyncs, where

OBJECTIVES = ("sft", "dpo", "distill-off-policy", "distill-on-policy", "grpo")
RUNTIME_RESERVE = 2 * 2**30  # CUDA context, NCCL and cuBLAS workspaces: not tensors, not tracked (assumed)
HEADROOM = 0.10


@dataclass
class TwinPlan:
    model: str = "qwen3-8b"
    gpus: int = 8
    tokens: int = 16384            # packed micro-batch budget per GPU (data.max_tokens)
    seq_len: int = 2048            # length of each packed sequence (attention cost)
    grad_accum: int = 1
    activation_checkpointing: bool = False
    precision: str = "bf16-mixed"
    gpu: str = "h100"
    attention: str = "flash_attn"  # which CUDA varlen kernel is installed: flash_attn or torch_varlen
    kept_vocab: int | None = None  # output rows kept by vocab.restrict (None: all)
    loss_fraction: float = 1.0     # share of tokens with a label
    grad_clip: float = 1.0
    optim_state_dtype: str = "fp32"  # optim.state_dtype: AdamW's moments in fp32 or bf16
    objective: str = "sft"         # sft, dpo (packed chosen+rejected pairs of seq_len tokens per side),
    #                                distill-off-policy or distill-on-policy
    reference: str | None = None   # dpo only: "live" (frozen reference model, the default) or "cached" log-probs
    teacher: str | None = None     # distill-on-policy: the teacher model (a name or config.json), e.g. qwen3-32b
    top_k: int = 20                # distill-off-policy: stored teacher log-probs per position (distill.top_k)
    ce_weight: float = 0.0         # distill-off-policy: distill.ce_weight
    group: int = 8                 # grpo: completions per prompt (grpo.num_generations), one group per micro-batch
    prompt_tokens: int = 512       # grpo: prompt length
    completion_tokens: int = 4096  # grpo: completion length (grpo.max_new_tokens, every completion at the cap)
    beta: float = 0.0              # grpo: KL weight; > 0 adds the frozen bf16 reference
    gather_for_sampling: bool = False  # grpo: grpo.gather_for_sampling (rollout memory)

    def __post_init__(self):
        if self.gpu not in GPUS:
            raise ValueError(f"gpu {self.gpu!r}: expected one of {', '.join(GPUS)}")
        if self.attention not in ("flash_attn", "torch_varlen"):
            raise ValueError(f"attention {self.attention!r}: expected flash_attn or torch_varlen")
        if self.optim_state_dtype not in ("fp32", "bf16"):
            raise ValueError(f"optim_state_dtype {self.optim_state_dtype!r}: expected fp32 or bf16")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if self.objective == "distill-on-policy" and self.teacher is None:
            raise ValueError("distill-on-policy needs a teacher model (e.g. qwen3-32b)")
        if self.teacher is not None and self.objective != "distill-on-policy":
            raise ValueError(f"teacher {self.teacher!r} applies to objective distill-on-policy only (off-policy "
                             "training reads stored top-k log-probs)")
        if not 1 <= self.top_k <= 128 or not 0 <= self.ce_weight <= 1:
            raise ValueError(f"top_k {self.top_k} must be in [1, 128] and ce_weight {self.ce_weight} in [0, 1]")
        if self.objective == "grpo":
            if min(self.group - 1, self.prompt_tokens, self.completion_tokens) < 1 or self.beta < 0:
                raise ValueError("grpo: group ≥ 2, prompt_tokens and completion_tokens ≥ 1, beta ≥ 0")
            self.tokens = self.group * (self.prompt_tokens + self.completion_tokens)  # the rollout micro-batch
        if self.objective in ("sft", "grpo") and self.reference is not None:
            raise ValueError(f"reference {self.reference!r} applies to objective dpo only (sft has no reference)")
        if self.objective == "dpo":
            self.reference = self.reference or "live"
            if self.reference not in ("cached", "live"):
                raise ValueError(f"reference {self.reference!r}: expected cached or live")
            if self.tokens < 4:
                raise ValueError(f"tokens {self.tokens}: a dpo micro-batch needs at least one pair (≥ 4 tokens)")
        if min(self.gpus, self.tokens, self.seq_len, self.grad_accum) < 1 or not 0 < self.loss_fraction <= 1:
            raise ValueError("gpus, tokens, seq_len, grad_accum must be positive and loss_fraction in (0, 1]")


def sequence_lengths(plan: TwinPlan) -> list[int]:
    """The packed sequences of one micro-batch; for dpo, pairs' sides in order (chosen, rejected, chosen, ...):
    sides of seq_len, then one shorter pair with the rest (under 4 tokens left out)."""
    if plan.objective == "grpo":
        return grpo_lengths(plan)
    if plan.objective == "dpo":
        side = min(plan.seq_len, plan.tokens // 2)
        full, rest = divmod(plan.tokens, 2 * side)
        return [side] * (2 * full) + ([rest // 2, rest - rest // 2] if rest >= 4 else [])
    full, rest = divmod(plan.tokens, min(plan.seq_len, plan.tokens))
    return [min(plan.seq_len, plan.tokens)] * full + ([rest] if rest else [])


def labelled_tokens(plan: TwinPlan) -> int:
    """Positions with a label in one micro-batch (a sequence's last position never has one; grpo: the
    completions' tokens, each scored from the position before it)."""
    if plan.objective == "grpo":
        return plan.group * plan.completion_tokens
    return sum(max(0, math.ceil(n * plan.loss_fraction) - 1) for n in sequence_lengths(plan))


def packed_batch(plan: TwinPlan, vocab_size: int) -> PackedBatch:
    """A host-side micro-batch of the plan's shape; `loss_fraction` of each sequence's positions are labelled."""
    lengths = sequence_lengths(plan)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    labels = torch.where(positions < (positions.new_tensor(lengths).repeat_interleave(torch.tensor(lengths)) *
                                      plan.loss_fraction).ceil().long() - 1, positions % vocab_size, -100)
    return PackedBatch(input_ids=positions % vocab_size, position_ids=positions, cu_seqlens=cu,
                       max_seqlen=max(lengths), labels=labels, loss_weight=torch.ones(plan.tokens))


def distill_batch(plan: TwinPlan, vocab_size: int) -> DistillBatch:
    """An off-policy micro-batch: the packed batch plus the stored teacher top-k ([T, top_k] ids and log-probs,
    −1 / 0 where unsupervised), as `DistillBatch.from_items` builds it."""
    packed = packed_batch(plan, vocab_size)
    labelled = (packed.labels != -100)[:, None]
    ids = torch.where(labelled, torch.arange(plan.top_k).expand(len(packed.labels), -1), -1)
    logprobs = torch.where(labelled, torch.full((len(packed.labels), plan.top_k), -math.log(plan.top_k)), 0.0)
    return DistillBatch(packed, ids, logprobs)


def _side(length: int, plan: TwinPlan, vocab_size: int, salt: int) -> Example:
    """One side of a synthetic pair: the reply is its last `loss_fraction`, so after the shift it has as many
    labelled positions as an SFT sequence of the same length (`labelled_tokens`)."""
    positions = np.arange(length)
    ids = ((positions + salt) % vocab_size).astype(np.int32)
    reply = positions >= length - math.ceil(length * plan.loss_fraction) + 1
    return Example(ids, np.where(reply, ids, -100).astype(np.int32))


def preference_batches(plan: TwinPlan, vocab_size: int) -> list[PreferenceBatch]:
    """`grad_accum` host-side micro-batches of packed chosen+rejected pairs (`PreferenceBatch.from_pairs`, as
    `pack_pairs` builds them); pair indices run over the whole step (keys of cached reference log-probs)."""
    sides = sequence_lengths(plan)
    per_batch = len(sides) // 2
    return [PreferenceBatch.from_pairs([
        PreferencePair(_side(sides[2 * i], plan, vocab_size, 0), _side(sides[2 * i + 1], plan, vocab_size, 1),
                       b * per_batch + i) for i in range(per_batch)]) for b in range(plan.grad_accum)]


def _frozen(model, mesh, device, method: str, fn):
    """A frozen model (a meta model in `frozen_dtype`) as `build_frozen` builds a DPO reference or a distillation
    teacher: sharded without a mixed-precision cast, then `freeze`d (frozen, eval mode, resharded after every
    forward), with its forward method bound (`sequence_logps`, or `score` as `load_teacher` binds it)."""
    if mesh is not None:
        shard_model(model, None, mesh=mesh)
    model.to_empty(device=device)
    model.reset_buffers()
    freeze(model)
    bind_forward_method(model, method, fn)
    return model


def local_bytes(module) -> int:
    """Bytes of this rank's parameters (the local shard of a DTensor)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in module.parameters())


def _tracker(model, optimizer, sharded: bool, probe: dict, frozen=None):
    """FSDPMemTracker (MemTracker without FSDP) that also records the peak inside the fused loss. `frozen` (a DPO
    reference) is tracked too: FSDPMemTracker instruments one root module, so its instrumentation is run once
    more with the frozen root (its shards count as "Sharded Param", its gathered weights "Unsharded Param")."""
    roots = [model] + ([frozen] if frozen is not None else [])
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    base = FSDPMemTracker if sharded else MemTracker

    class Tracker(base):
        def _instrument_fsdp_module(self):
            """The root unit runs through `loss` (an FSDP forward method), which calls the FSDP state's
            pre/post-forward directly instead of module hooks: instrument those calls too."""
            for root in roots:
                self._root_mod = root
                super()._instrument_fsdp_module()
                state = root._get_fsdp_state()
                self._mod_tracker._known_modules[root] = type(root).__name__
                state._pre_forward = self._fsdp_state_pre_forward(root, type(state)._pre_forward.__get__(state))
                state._post_forward = self._fsdp_state_post_forward(root, type(state)._post_forward.__get__(state))
            self._root_mod = model

        def _fsdp_state_pre_forward(self, fsdp_mod, orig):
            inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)

            def pre_forward(*args, **kwargs):
                if not self._mod_tracker.is_bw:  # per-module stats are not reported: one forward per micro-batch
                    self.memory_tracking.pop(fsdp_mod, None)
                return inner(*args, **kwargs)
            return pre_forward

        def _deregister_module_and_optimizer_hooks(self):
            super()._deregister_module_and_optimizer_hooks()
            for root in roots:
                state = root._get_fsdp_state()
                for name in ("_pre_forward", "_post_forward"):
                    state.__dict__.pop(name, None)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            """MemTracker (one GPU) hooks every parameter's gradient; a frozen reference's have none."""
            frozen_module = not any(param.requires_grad for param in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and not frozen_module)

        def _pre_fw_hook(self, module, inputs):  # MemTracker (one GPU): one forward per micro-batch
            if not self._mod_tracker.is_bw:
                self.memory_tracking.pop(module, None)
            return super()._pre_fw_hook(module, inputs)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if in_sharding_propagation():
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _update_peak_stats(self, peak_state):
            before = self._peak_mem.copy()
            super()._update_peak_stats(peak_state)
            if self._peak_mem != before:  # a new peak: remember where the step was
                probe["peak_at"] = f"{probe.get('region', '?')}/{where()}"
            if probe.get("active"):
                total = sum(snap["Total"] for dev, snap in self._curr_mem_snap.items() if dev.type == "cpu")
                probe["peak"] = max(probe.get("peak", 0), total)

    if sharded:
        return Tracker(model, optimizer)
    tracker = Tracker()
    tracker.track_external(*roots, optimizer)
    return tracker


def _device_snapshot(snapshot: dict) -> dict:
    out = {}
    for device, categories in snapshot.items():
        if device.type == "cpu":
            for key, value in categories.items():
                name = getattr(key, "value", key)
                out[name] = out.get(name, 0) + value
    return out


@contextlib.contextmanager
def _loss_probe(tracker, probe: dict):
    """Measures the fused loss calls (the model's `loss`, DPO's `sequence_logps`, distillation's KL): memory at
    entry and the peak inside (both on the GPU)."""
    from qforge.engine import model as model_module
    from qforge.engine.train import distill as distill_module
    from qforge.engine.train import dpo as dpo_module
    from qforge.engine.train import logps as logps_module

    def probed(original):
        def call(*args, **kwargs):
            entry = sum(s["Total"] for d, s in tracker._curr_mem_snap.items() if d.type == "cpu")
            probe.update(active=True, peak=entry)
            try:
                return original(*args, **kwargs)
            finally:
                probe["active"] = False
                probe["loss_temporaries"] = max(probe.get("loss_temporaries", 0), probe["peak"] - entry)
        return call

    callers = [(module, "fused_linear_cross_entropy") for module in (model_module, dpo_module, logps_module)] + \
        [(distill_module, "fused_linear_kl")]
    originals = [getattr(module, name) for module, name in callers]
    for (module, name), original in zip(callers, originals):
        setattr(module, name, probed(original))
    try:
        yield
    finally:
        for (module, name), original in zip(callers, originals):
            setattr(module, name, original)


@contextlib.contextmanager
def _host_side_dpo_counts():
    """`chosen_token_count` reads the host micro-batches (before their move) in a GPU run; on the twin's CPU
    device its `arange` would be fake, so it runs outside the fake mode, for real, as on a GPU host."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from qforge.engine.train import dpo as dpo_module

    original = dpo_module.chosen_token_count

    def on_host(batch):
        with unset_fake_temporarily():
            return original(batch)

    dpo_module.chosen_token_count = on_host
    try:
        yield
    finally:
        dpo_module.chosen_token_count = original


def create_optimizer_state(model, optimizer):
    """What a first step leaves behind: AdamW's moments (a step on zero gradients creates them)."""
    with torch.no_grad():
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _ensure_process_group(gpus: int, rank: int = 0):
    """The fake process group of `gpus` ranks, seen from `rank` (collectives return without moving data)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_backend() != "fake" or dist.get_world_size() != gpus or dist.get_rank() != rank:
            dist.destroy_process_group()
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=gpus)


def twin_mesh(gpus: int, rank: int):
    """The 1-D device mesh of the fake process group seen from `rank`. Its dimension is named after the rank:
    meshes compare equal by layout, not rank, and torch reuses an equal mesh it has seen, so a later rank's
    parameters would otherwise carry rank 0's mesh (and rank 0's coordinate: its rows, its shard)."""
    from torch.distributed.device_mesh import init_device_mesh

    _ensure_process_group(gpus, rank)
    return init_device_mesh("cpu", (gpus,), mesh_dim_names=(f"twin_rank{rank}",))


def _objective(plan: TwinPlan, config):
    """The objective, this rank's host-side micro-batches and the meta model of a frozen second model (a live
    DPO or GRPO reference, an on-policy teacher; None without one), built before the fake mode as the trainer
    builds them."""
    objective = None  # sft: the trainer's train_step
    frozen = None
    if plan.objective == "dpo":
        batches = preference_batches(plan, config.vocab_size)
        objective = DPO(reference=plan.reference)
        if plan.reference == "cached":  # what DPO.prepare reads from reference_dir: fp32 [pairs, 2] on the host
            objective.reference_logps = torch.zeros(sum(b.num_pairs for b in batches), 2)
        else:
            frozen = meta_model(config, frozen_dtype(plan.precision))
    elif plan.objective == "grpo":
        objective, batches = grpo_objective(plan, config.vocab_size)
        if plan.beta > 0:
            frozen = meta_model(config, frozen_dtype(plan.precision))
    elif plan.objective == "distill-off-policy":
        batches = [distill_batch(plan, config.vocab_size) for _ in range(plan.grad_accum)]
        objective = OffPolicyDistill("<stored top-k>", top_k=plan.top_k, ce_weight=plan.ce_weight)
    else:
        batches = [packed_batch(plan, config.vocab_size) for _ in range(plan.grad_accum)]
        if plan.objective == "distill-on-policy":  # the micro-batches stand for sampled prompt + completion rows
            objective = OnPolicyDistill(plan.teacher)
            teacher_config = resolve_config(plan.teacher)
            if teacher_config.vocab_size != config.vocab_size:
                raise ValueError(f"teacher {plan.teacher}: vocabulary {teacher_config.vocab_size} differs from the "
                                 f"student's {config.vocab_size}")
            frozen = meta_model(teacher_config, frozen_dtype(plan.precision))
    return objective, batches, frozen


def run_twin(plan: TwinPlan, rank: int = 0) -> dict:
    """The plan's step as fake rank `rank` sees it (every rank's shards have the same size: FSDP2 pads)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gpu = GPUS[plan.gpu]
    config = resolve_config(plan.model)
    sharded = plan.gpus > 1
    lengths = sequence_lengths(plan)
    syncs, roofline = HostSyncs(labelled_tokens(plan), sum(lengths)), Roofline(gpu, plan.gpus)
    probe: dict = {}
    collectives = Collectives()

    def attention_observer(direction, q, k, v):
        roofline.attention(direction, q, k, v, lengths)

    device = torch.device("cpu")
    dist_ = Dist(rank, plan.gpus, device)
    param_dtype, compute_dtype, autocast = precision_policy(plan.precision, dist_)
    mesh = None
    if sharded:
        mesh = twin_mesh(plan.gpus, rank)
    model = meta_model(config, param_dtype)
    model.activation_checkpointing = plan.activation_checkpointing
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    objective, batches, frozen = _objective(plan, config)
    # host side, before the fake mode, as the trainer builds it
    vocab = VocabMap.from_ids(range(plan.kept_vocab), config.vocab_size) if plan.kept_vocab else None
    with fake_mode, FakeDeviceFunctions(fake_mode) as functions, route_cuda_paths(), mark_sharding_propagation(), \
            triton_launch_standins(roofline.triton_launch), attention_standins(plan.attention, attention_observer):
        if sharded:
            shard_model(model, compute_dtype, mesh=mesh)
        model.to_empty(device=device)
        model.reset_buffers()
        model.train()
        optimizer = build_optimizer(model, OptimSettings(state_dtype=plan.optim_state_dtype))
        create_optimizer_state(model, optimizer)
        step = train_step
        if plan.objective == "dpo":  # the pieces of DPO.prepare, with the twin's reference in place of build_frozen
            objective.tables = loss_tables(vocab, dist_.device)
            bind_forward_method(model, "sequence_logps", sequence_logps)
            if plan.reference == "live":
                frozen = objective.reference_model = _frozen(frozen, mesh, device, "sequence_logps", sequence_logps)
            step = objective.train_step
        elif plan.objective == "grpo":
            frozen = prepare_grpo(objective, model, frozen, loss_tables(vocab, dist_.device),
                                  lambda m, name, fn: _frozen(m, mesh, device, name, fn))
            step = objective.train_step
        elif plan.objective == "distill-off-policy":
            objective.prepare(model, None, vocab, dist_, autocast)
            step = objective.train_step
        elif plan.objective == "distill-on-policy":  # OnPolicyDistill.prepare, the twin's teacher for load_teacher
            objective.teacher = frozen = _frozen(frozen, mesh, device, "score", teacher_score)
            objective.attach(model, vocab)
            step = objective.learn  # the step after sampling: the batches stand for sampled rows
        tracker = _tracker(model, optimizer, sharded, probe, frozen)
        with tracker, _loss_probe(tracker, probe), _host_side_dpo_counts(), syncs, roofline, collectives:
            syncs.region = roofline.region = collectives.region = probe["region"] = "micro-batches"
            step(model, batches, dist_, vocab, autocast)
            syncs.region = roofline.region = collectives.region = probe["region"] = "optimizer"
            optimizer_step(model, optimizer, plan.grad_clip)
        peak = _device_snapshot(tracker.get_tracker_snapshot("peak"))
        host_to_device = functions.host_to_device_bytes
        frozen_bytes = local_bytes(frozen) if frozen is not None else 0

    result = _report(plan, config, gpu, peak, probe, roofline, syncs, lengths, host_to_device)
    result["collectives"] = collectives.calls
    result["collective_volume"] = volume(collectives.calls)
    # already inside "parameters (sharded)"/"(gathered)": the tracker sees it
    if plan.objective == "dpo" or (plan.objective == "grpo" and frozen is not None):
        result["memory"]["reference_sharded_bytes"] = frozen_bytes
    if plan.objective == "grpo":
        rollout = result["rollout"] = rollout_memory(plan, config, result)
        rollout["fits"] = rollout["peak_bytes"] <= (1 - HEADROOM) * gpu.memory_bytes
    if plan.objective == "distill-on-policy":
        result["memory"]["teacher_sharded_bytes"] = frozen_bytes
    return result


def check_collectives(plan: TwinPlan) -> dict:
    """The step traced once per rank; a CollectiveDivergence names the first collective two ranks disagree on.
    Returns rank 0's report with the count of collectives every rank issues."""
    results = {rank: run_twin(plan, rank) for rank in range(plan.gpus)}
    check_sequences({rank: result["collectives"] for rank, result in results.items()})
    results[0]["collectives_checked"] = {"ranks": plan.gpus, "per_rank": len(results[0]["collectives"])}
    return results[0]


CATEGORIES = {  # report category → FSDPMemTracker / MemTracker reference types
    "parameters (sharded)": ("Sharded Param", "Parameter", "Buffer"),
    "parameters (gathered)": ("Unsharded Param",),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Gradient"),
    "optimizer state": ("OptState", "Optstate"),
    "activations": ("Activation",),
    "backward temporaries": ("Temp",),
    "communication buffers": ("All Gather", "Reduce Scatter"),
    "inputs": ("Inputs",),
}


def _report(plan, config, gpu, peak, probe, roofline, syncs, lengths, host_to_device) -> dict:
    by_category = {name: sum(peak.get(key, 0) for key in keys) for name, keys in CATEGORIES.items()}
    tracked = peak.get("Total", sum(by_category.values()))
    total = tracked + RUNTIME_RESERVE
    ops = roofline.summary()
    compute = sum(row["seconds"] for name, row in ops.items() if name != "communication")
    communication = ops.get("communication", {}).get("seconds", 0.0)
    rows = plan.kept_vocab or config.vocab_size
    model_flops = training_flops(config, lengths, labelled_tokens(plan), rows) * plan.grad_accum
    step_seconds = max(compute, communication)
    peak_flops = gpu.peak_flops(torch.bfloat16 if plan.precision != "fp32" else torch.float32)
    return {
        "plan": asdict(plan),
        "gpu": {"name": gpu.name, "memory_bytes": gpu.memory_bytes, "source": gpu.source},
        "memory": {
            "peak_tracked_bytes": tracked, "runtime_reserve_bytes": RUNTIME_RESERVE, "peak_bytes": total,
            "by_category_at_peak": by_category, "loss_temporaries_bytes": probe.get("loss_temporaries", 0),
            "peak_at": probe.get("peak_at"),
            "tracker_categories_at_peak": peak, "fits": total <= (1 - HEADROOM) * gpu.memory_bytes,
            "headroom_fraction": 1 - total / gpu.memory_bytes,
        },
        "roofline": {
            "note": "a roofline bound from datasheet peaks, not a measurement",
            "by_op_class": ops, "compute_seconds_per_step": compute,
            "compute_seconds_per_micro_batch": compute / plan.grad_accum,
            "communication_seconds_per_step": communication, "step_seconds_bound": step_seconds,
            "model_flops_per_step": model_flops, "predicted_mfu_bound": model_flops / (step_seconds * peak_flops),
            "tokens_per_s_per_gpu_bound": plan.tokens * plan.grad_accum / step_seconds,
            "host_to_device_bytes": host_to_device,
        },
        "host_syncs": syncs.records(),
    }
