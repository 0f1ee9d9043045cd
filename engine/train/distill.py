"""Strong-to-weak distillation as trainer objectives (see objective.py), both on `fused_linear_kl`, which never
materialises the student's [T, V] logits and works over the kept vocabulary.

- Off-policy: a teacher run scores the SFT data once (teacher forcing on the data's own replies) and keeps
  its top-k log-probs at every supervised position — a local checkpoint here, or an OpenAI-compatible
  endpoint (teacher_endpoint.py); they are stored next to the data under `teacher_dir`, keyed by the
  tokenised data, the teacher (weights, or served model + URL) and k, so later and resumed runs read them.
  The student minimises forward KL to the renormalised top-k, or (1 − ce_weight)·KL + ce_weight·CE.
- On-policy: for each micro-batch of prompts the student samples completions with qforge's generation, the
  teacher scores them (its final hidden states go into the fused kernel) and the student minimises reverse
  KL(p_student ‖ p_teacher) on its own samples. A micro-batch's sampling seed is derived from its place in
  the epoch's packing (which the data cursor restores), so a resumed run draws the same samples.

Under torchrun the teacher is frozen and sharded with FSDP2 like the student (each rank reads only its shards of
the checkpoint and holds 1/world of the weights); it reshards after every forward. Its forward method `score`
returns the final hidden states and a copy of the gathered output head, the only teacher tensors the fused
kernel needs, so nothing of the teacher outside a forward touches sharded weights. Every rank runs the teacher
equally often (equal micro-batch counts; off-policy scoring deals its groups round-robin and pads).

Both normalise by the step's Σ w over supervised tokens like SFT: they bind the KL loss as the student's forward
method `distill_loss` and run SFT's token-weighted `train_step` / `evaluate_loss` with it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qforge.kernels import fused_linear_kl

from ..config import Qwen3Config
from ..data import PackedBatch
from ..data.distill import DistillBatch, TeacherTargets
from ..data.prompts import Prompt, PromptBatch, load_prompts
from ..data.example import Example, make_example, zero_weight
from ..data.packing import Batches, pack_items
from ..errors import ConfigError, DataError
from ..files import check_writable_dir, replace_dir, staged_dir
from ..generate import gathered, generate, is_sharded
from ..model import Qwen3
from ..precision import autocast_weight
from ..vocab import VocabMap
from .build import build_frozen, frozen_dtype, release
from .config import ModelSettings
from ..model import bind_forward_method
from .objective import Step, weights_identity
from .parallel import shard_model
from .sft import evaluate_loss, load_sft_data, train_step
from .teacher_endpoint import EndpointTeacher, discard

log = logging.getLogger("qforge.train.distill")
LOSS = "distill_loss"  # the student's forward method computing the distillation loss (bound by `prepare`)


# --- off-policy ----------------------------------------------------------------------------------------------
def pack_whole(items, max_tokens: int, seed: int, make_batch) -> Batches:
    """`pack_items` of the items that fit whole (cutting a sequence would misalign its per-position targets, or
    a prompt's completion budget)."""
    kept = [item for item in items if len(item) <= max_tokens and item.num_loss_tokens > 0]
    if len(kept) < len(items):
        log.warning("dropped %d sequences longer than data.max_tokens=%d", len(items) - len(kept), max_tokens)
    return pack_items(kept, max_tokens, seed, make_batch)


def student_kl_loss(model, batch, vocab_index=None, target_index=None, *, ce_weight=0.0, teacher=None,
                    direction="forward"):
    """Σ w·(KL or KL+CE) of a batch: top-k targets (DistillBatch) or, with `teacher`, its full distribution."""
    packed = batch.packed if isinstance(batch, DistillBatch) else batch
    hidden = Qwen3.hidden(model, packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    weight = autocast_weight(model.output_weight, hidden)  # the head in the compute dtype, as `Qwen3.loss`
    hidden = hidden.to(weight.dtype)
    options = dict(loss_weight=packed.loss_weight, vocab_index=vocab_index, reduction="sum")
    if teacher is None:
        return fused_linear_kl(hidden, weight, packed.labels, target_ids=batch.target_ids,
                               target_logprobs=batch.target_logprobs, ce_weight=ce_weight, **options)
    with torch.no_grad():
        teacher_hidden, teacher_weight = _scorer(teacher)(packed.input_ids, packed.position_ids,
                                                          packed.cu_seqlens, packed.max_seqlen)
    return fused_linear_kl(hidden, weight, packed.labels, teacher_hidden=teacher_hidden,
                           teacher_weight=teacher_weight, direction=direction, **options)


def check_teacher(path, student) -> None:
    """A ConfigError unless distill.teacher is a checkpoint with the student's vocabulary size (its top-k ids index
    the student's output rows: another tokenizer would index past them). `student`: the run's ModelSettings."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"distill.teacher={path}: no config.json there (expected an HF checkpoint directory)")
    try:
        student_config = Path(student.path) / "config.json" if student.path else Path(student.config)
        student_size = Qwen3Config.from_json(student_config).vocab_size
    except (OSError, ValueError, KeyError):
        return  # the student's own load reports an unreadable config
    teacher_size = Qwen3Config.from_json(Path(path) / "config.json").vocab_size
    if teacher_size != student_size:
        raise ConfigError(f"distill.teacher={path}: vocabulary size {teacher_size} differs from the student's "
                          f"{student_size}; the teacher must share the student's tokenizer")


def load_teacher(path, precision: str, dist_) -> Qwen3:
    """The frozen teacher in `frozen_dtype`. Under torchrun it is built on the meta device, sharded with FSDP2 and
    filled by `load_sharded` (each rank reads its own rows) exactly as the student, and reshards after every
    forward."""
    shard = (lambda m: shard_model(m, None, dist_.device)) if dist_.enabled else None
    teacher = build_frozen(ModelSettings(path=str(path)), frozen_dtype(precision), dist_.device, shard=shard)
    bind_forward_method(teacher, "score", teacher_score)
    return teacher


def teacher_score(teacher, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None):
    """The teacher's forward method: (final hidden states [T, H], output head [V, H]). A sharded teacher's head
    exists only inside this call (gathered), so it is copied out for the fused kernel that runs after it."""
    hidden = Qwen3.hidden(teacher, input_ids, position_ids, cu_seqlens, max_seqlen)
    return hidden, teacher.output_weight.clone() if is_sharded(teacher) else teacher.output_weight


def _scorer(teacher):
    """The teacher's `score` forward method (bound by load_teacher; a sharded teacher needs it), or the same
    function on a teacher loaded otherwise."""
    return teacher.score if "score" in vars(teacher) else functools.partial(teacher_score, teacher)


def teacher_output_ids(path) -> torch.Tensor | None:
    """The token ids a teacher can produce: its exported kept vocabulary minus suppressed ids (a teacher trained
    with vocab.restrict), or None for the whole vocabulary."""
    kept_file = Path(path) / "kept_ids.json"
    if not kept_file.is_file():
        return None
    vocab = VocabMap.load(kept_file)
    return vocab.kept_ids[~torch.isin(vocab.kept_ids, vocab.suppress_ids)]


def score_groups(examples: list[Example], max_tokens: int) -> list[list[int]]:
    """Consecutive examples grouped into teacher forwards of at most `max_tokens` tokens (a longer one alone)."""
    groups, size = [], 0
    for i, example in enumerate(examples):
        if not groups or size + len(example) > max_tokens:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += len(example)
    return groups


def _targets_of(example: Example) -> int:
    return int(np.count_nonzero(example.labels[1:] != -100))


@torch.no_grad()
def teacher_top_k(teacher, examples: list[Example], k: int, max_tokens: int, device, output_ids=None,
                  chunk_bytes: int = 2**28, rank: int = 0, world: int = 1, progress: bool = False):
    """(ids int32 [targets, k], log-probs float32 [targets, k]) per example: the teacher's next-token top-k at
    each supervised target over `output_ids` (default: its whole vocabulary), in chunks of rows (no [T, V]).

    With `world` > 1 (a sharded teacher) rank r scores groups r, r + world, … of `score_groups` and returns None
    for the other ranks' examples; a rank short of a group runs an idle forward, so all run equally many."""
    teacher.eval()
    score = _scorer(teacher)
    groups = score_groups(examples, max_tokens)
    results = [None] * len(examples)
    for start in tqdm(range(0, len(groups), world), desc="teacher top-k", unit="group", disable=not progress):
        if start + rank >= len(groups):
            score(torch.zeros(1, dtype=torch.long, device=device))  # FSDP's all-gathers are collectives
            continue
        group = [examples[i] for i in groups[start + rank]]
        packed = PackedBatch.from_examples(group).to(device)
        hidden, weight = score(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
        hidden = hidden[packed.labels != -100]
        if output_ids is not None:
            weight = weight[output_ids.to(device)]
        rows_per_chunk = max(1, chunk_bytes // (weight.shape[0] * 4))
        ids, logprobs = [], []
        for row in range(0, len(hidden), rows_per_chunk):
            top = (hidden[row:row + rows_per_chunk] @ weight.T).float().log_softmax(-1).topk(min(k, len(weight)))
            ids.append((top.indices if output_ids is None else output_ids.to(device)[top.indices]).int().cpu())
            logprobs.append(top.values.cpu())
        ids, logprobs = torch.cat(ids).numpy(), torch.cat(logprobs).numpy()
        counts = np.cumsum([0] + [_targets_of(e) for e in group])
        for i, a, b in zip(groups[start + rank], counts[:-1], counts[1:]):
            results[i] = (ids[a:b], logprobs[a:b])
    return results


def _read_store(path: Path, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, log-probs) per example from a teacher store, or a DataError saying how to rebuild a damaged one (the
    store is written whole and renamed into place, so a missing or cut file was removed or damaged later)."""
    try:
        ids, logprobs = np.load(path / "ids.npy", mmap_mode="r"), np.load(path / "logprobs.npy", mmap_mode="r")
        offsets = np.load(path / "offsets.npy")
        if len(offsets) != count + 1 or offsets[-1] != len(ids) or ids.shape != logprobs.shape:
            raise ValueError("its arrays do not match the examples or each other")
    except (OSError, ValueError, EOFError) as error:
        reason = f"{Path(error.filename).name} is missing" if isinstance(error, FileNotFoundError) else str(error)
        raise DataError(f"teacher store {path} is damaged ({reason}); delete that directory and rerun: the teacher "
                        f"scores the data again and rebuilds it") from None
    return [(ids[a:b], logprobs[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


class OffPolicyDistill:
    """`teacher_path` (a local checkpoint) or `endpoint` (an OpenAI-compatible server, teacher_endpoint.py)
    produces the top-k; both are stored alike."""

    def __init__(self, teacher_path: str | None, top_k: int = 20, ce_weight: float = 0.0,
                 teacher_dir: str | None = None, endpoint: EndpointTeacher | None = None):
        if not 1 <= top_k <= 128:
            raise ValueError(f"distill.top_k must be in [1, 128], got {top_k}")
        if not 0.0 <= ce_weight <= 1.0:
            raise ValueError(f"distill.ce_weight must be in [0, 1], got {ce_weight}")
        if (teacher_path is None) == (endpoint is None):
            raise ValueError("set exactly one of distill.teacher (a checkpoint) or distill.teacher_endpoint")
        self.teacher_path, self.top_k, self.ce_weight, self.teacher_dir = teacher_path, top_k, ce_weight, teacher_dir
        self.endpoint = endpoint
        self._teacher = None

    @property
    def teacher_identity(self):
        return self.endpoint.identity if self.endpoint is not None else weights_identity(self.teacher_path)

    def check_inputs(self, config):
        if self.teacher_path is not None:
            check_teacher(self.teacher_path, config.model)
        if self.teacher_dir is not None:
            check_writable_dir(self.teacher_dir, "distill.teacher_dir")

    def trained_settings(self) -> dict:
        """What a resume must not change silently (see loop.trained_settings): the teacher."""
        teacher = str(Path(self.teacher_path).resolve()) if self.teacher_path else self.endpoint.identity
        return {"distill.teacher": teacher, "distill.top_k": self.top_k}

    def load_data(self, config, template, dist_):
        datasets, eval_examples, fingerprint = load_sft_data(config, template, dist_)
        directory = Path(self.teacher_dir or Path(config.output.dir) / "teacher")
        sets = datasets + [eval_examples]
        try:
            targets = [self._targets(examples, directory, config, template, dist_) for examples in sets]
        finally:  # loaded at most once for all sets (when any store is missing), freed here
            if self._teacher is not None:
                release(self._teacher)
            self._teacher = None
        items = [[TeacherTargets(e, ids, lp) for e, (ids, lp) in zip(examples, t)] for examples, t in zip(sets, targets)]
        return items[:-1], items[-1], {**fingerprint, "teacher": self.teacher_identity, "top_k": self.top_k}

    def _targets(self, examples, directory: Path, config, template, dist_):
        """The stored teacher top-k of these examples, computed once when missing, every rank scoring its share:
        with the sharded local teacher, or through the endpoint (its share of the requests)."""
        if not examples:
            return []
        identity = {"teacher": self.teacher_identity, "k": self.top_k}
        if self.endpoint is None:  # the local teacher's dtype, see load_teacher
            identity["dtype"] = str(frozen_dtype(config.train.precision)).removeprefix("torch.")
        digest = hashlib.sha256(json.dumps(identity).encode())
        for example in examples:
            digest.update(example.input_ids.tobytes())
            digest.update(example.labels.tobytes())
        path = directory / digest.hexdigest()[:32]
        missing = float(dist_.all_reduce_sum(float(dist_.is_main and not path.is_dir())))
        if missing and self.endpoint is None:
            self._score_and_store(examples, path, config, dist_)
        elif missing:  # every rank requests its share of the chunks; rank 0 stores them all
            partial = directory / f".{path.name}.partial"
            self.endpoint.score_chunks(examples, self.top_k, template.tokenizer, partial,
                                       config.output.progress and dist_.is_main, dist_.rank, dist_.world)
            dist_.barrier()
            if dist_.is_main:
                with staged_dir(path) as tmp:
                    self._save_share(tmp, 0, self.endpoint.read_chunks(examples, partial))
                    self._merge_shares(tmp, examples, [list(range(len(examples)))], world=1)
                log.info("teacher top-%d of %d examples stored in %s", self.top_k, len(examples), path)
                discard(partial)
        dist_.barrier()
        return _read_store(path, len(examples))

    def _score_and_store(self, examples, path: Path, config, dist_):
        """Every rank scores its groups with the (sharded) local teacher and saves them as its share in one
        staging directory; rank 0 merges the shares in example order and renames the directory into place."""
        if self._teacher is None:
            self._teacher = load_teacher(self.teacher_path, config.train.precision, dist_)
        scored = teacher_top_k(self._teacher, examples, self.top_k, config.data.max_tokens, dist_.device,
                               teacher_output_ids(self.teacher_path), rank=dist_.rank, world=dist_.world,
                               progress=config.output.progress and dist_.is_main)
        pid = int(dist_.all_reduce_sum(float(os.getpid() if dist_.is_main else 0)))  # rank 0's: one staging dir
        tmp = path.parent / f".{path.name}.tmp{pid}"
        tmp.mkdir(parents=True, exist_ok=True)
        self._save_share(tmp, dist_.rank, [result for result in scored if result is not None])
        dist_.barrier()
        if dist_.is_main:
            self._merge_shares(tmp, examples, score_groups(examples, config.data.max_tokens), dist_.world)
            replace_dir(tmp, path)
            log.info("teacher top-%d of %d examples stored in %s", self.top_k, len(examples), path)

    def _save_share(self, tmp: Path, rank: int, scored):
        empty = np.zeros((0, self.top_k))
        np.save(tmp / f"ids-{rank}.npy", np.concatenate([ids for ids, _ in scored] or [empty]).astype(np.int32))
        np.save(tmp / f"logprobs-{rank}.npy", np.concatenate([lp for _, lp in scored] or [empty]).astype(np.float32))

    def _merge_shares(self, tmp: Path, examples, groups: list[list[int]], world: int):
        """ids.npy / logprobs.npy / offsets.npy of `examples` from the ranks' shares (rank r holds groups r,
        r + world, … in order), copied file to file (memory-mapped): rank 0 never holds the whole store."""
        offsets = np.cumsum([0] + [_targets_of(e) for e in examples])
        for name, dtype in (("ids", np.int32), ("logprobs", np.float32)):
            shares = [np.load(tmp / f"{name}-{r}.npy", mmap_mode="r") for r in range(world)]
            width = next((share.shape[1] for share in shares if len(share)), self.top_k)  # k, or fewer ids
            merged = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype,
                                               shape=(int(offsets[-1]), width))
            taken, row = [0] * world, 0
            for g, group in enumerate(groups):
                rank, rows = g % world, int(offsets[group[-1] + 1] - offsets[group[0]])
                merged[row:row + rows] = shares[rank][taken[rank]:taken[rank] + rows]
                taken[rank], row = taken[rank] + rows, row + rows
            merged.flush()
            del merged, shares
            for r in range(world):
                (tmp / f"{name}-{r}.npy").unlink()
        np.save(tmp / "offsets.npy", offsets)

    def pack(self, items, max_tokens: int, seed: int = 0, *, overlong: str = "truncate", loss_weighting: str = "token",
             vocab=None):
        """Whole sequences only (their targets are per position); the data's labels are checked against the
        kept vocabulary before training (and the KL itself is over the kept vocabulary)."""
        return pack_whole(items, max_tokens, seed, lambda group, _: DistillBatch.from_items(group, loss_weighting))

    def filler(self, item: TeacherTargets, max_tokens: int) -> DistillBatch:
        """`item` without supervised positions (so without targets): a micro-batch that runs the forward and
        backward of a real one but adds nothing (train.batch_size steps deal it to a rank short of one)."""
        return DistillBatch.from_items([TeacherTargets(zero_weight(item.example, max_tokens), item.ids[:0],
                                                       item.logprobs[:0])])

    def prepare(self, model, config, vocab, dist_, autocast):
        """Binds the student's KL loss as its forward method `distill_loss` (the model's own `loss` stays CE)."""
        bind_forward_method(model, LOSS, lambda m, batch, **o: student_kl_loss(m, batch, ce_weight=self.ce_weight,
                                                                                **o))

    def train_step(self, model, micro_batches, dist_, vocab, autocast) -> Step:
        metrics = {}  # a MoE student's router_aux_loss and expert load (sft.RouterAuxStep)
        return Step(*train_step(model, micro_batches, dist_, vocab, autocast, loss=LOSS, metrics=metrics), metrics,
                    micro_batches)

    def evaluate(self, model, batches, dist_, vocab, autocast) -> dict:
        return {"eval_loss": evaluate_loss(model, batches, dist_, vocab, autocast, loss=LOSS)}


# --- on-policy -----------------------------------------------------------------------------------------------
class OnPolicyDistill:
    def __init__(self, teacher_path: str, max_new_tokens: int = 128, temperature: float = 1.0,
                 enable_thinking: bool = True, gather_for_sampling: bool = False):
        self.teacher_path, self.max_new_tokens = teacher_path, max_new_tokens
        self.temperature, self.enable_thinking = temperature, enable_thinking
        self.gather_for_sampling = gather_for_sampling  # FSDP: sample with the student gathered (see `gathered`)
        self.teacher, self.template, self.suppress = None, None, []

    def load_data(self, config, template, dist_):
        self.template = template
        datasets = [self._prompts(path, config, template) for path in config.data.train]
        fingerprint = {"prompts": hashlib.sha256(b"".join(p.prompt_ids.tobytes() + b"\0" for d in datasets
                                                          for p in d)).hexdigest()[:32],
                       "weights": config.data.weights, "max_tokens": config.data.max_tokens,
                       "max_new_tokens": self.max_new_tokens, "seed": config.train.seed}
        return datasets, [p for path in config.data.eval for p in self._prompts(path, config, template)], fingerprint

    def _prompts(self, path, config, template) -> list[Prompt]:
        return load_prompts(path, template, self.max_new_tokens, fmt=config.data.format,
                            max_row_bytes=config.data.max_row_bytes, enable_thinking=self.enable_thinking)

    def pack(self, items, max_tokens: int, seed: int = 0, *, overlong: str = "truncate", loss_weighting: str = "token",
             vocab=None):
        """Prompts packed by their budget (prompt + max_new_tokens), each micro-batch seeded by its position."""
        return pack_whole(items, max_tokens, seed,
                          lambda group, position: PromptBatch(group, (seed * 1_000_003 + position) % 2**31))

    def check_inputs(self, config):
        check_teacher(self.teacher_path, config.model)

    def trained_settings(self) -> dict:
        return {"distill.teacher": str(Path(self.teacher_path).resolve())}

    def prepare(self, model, config, vocab, dist_, autocast):
        self.teacher = load_teacher(self.teacher_path, config.train.precision, dist_)
        self.attach(model, vocab)

    def attach(self, model, vocab):
        """The student's reverse-KL loss against the loaded `teacher` (its forward method `distill_loss`), and the
        tokens it may not sample."""
        if vocab is not None:  # the student samples only what its output head is trained on
            mask = torch.ones(model.config.vocab_size, dtype=torch.bool)
            mask[vocab.kept_ids[~torch.isin(vocab.kept_ids, vocab.suppress_ids)]] = False
            self.suppress = mask.nonzero().squeeze(1).tolist()
        bind_forward_method(model, LOSS, lambda m, batch, **o: student_kl_loss(
            m, batch, teacher=self.teacher, direction="reverse", **o))

    @torch.no_grad()
    def sample(self, model, batch: PromptBatch, device, greedy: bool) -> PackedBatch:
        """The student's completions (through <|im_end|>, or cut at max_new_tokens) after their prompts, packed
        (labels on the completions)."""
        was_training = model.training
        model.eval()
        prompts = [p.prompt_ids.tolist() for p in batch.prompts]
        with gathered(model) if self.gather_for_sampling else contextlib.nullcontext():
            completions = generate(model, prompts, max_new_tokens=self.max_new_tokens,
                                   temperature=0.0 if greedy else self.temperature,
                                   stop_ids=[self.template.eos_id], suppress_ids=self.suppress, seed=batch.seed)
        model.train(was_training)
        examples = []
        for prompt, completion in zip(prompts, completions):
            if len(completion) < self.max_new_tokens:
                completion = completion + [self.template.eos_id]
            supervised = np.r_[np.zeros(len(prompt), bool), np.ones(len(completion), bool)]
            examples.append(make_example(prompt + completion, supervised))
        return PackedBatch.from_examples(examples).to(device)

    def train_step(self, model, micro_batches, dist_, vocab, autocast) -> Step:
        """Samples every micro-batch's completions with the current weights, then `learn`s from them."""
        return self.learn(model, [self.sample(model, b, dist_.device, greedy=False) for b in micro_batches], dist_,
                          vocab, autocast)

    def learn(self, model, sampled: list[PackedBatch], dist_, vocab, autocast) -> Step:
        """The reverse-KL step on sampled sequences (Σ w·KL / Σ w over their completion tokens)."""
        metrics = {}  # a MoE student's router_aux_loss and expert load (sft.RouterAuxStep)
        return Step(*train_step(model, sampled, dist_, vocab, autocast, loss=LOSS, metrics=metrics), metrics, sampled)

    def evaluate(self, model, batches, dist_, vocab, autocast) -> dict:
        """Greedy samples scored like training; each rank samples only the batches it evaluates (on access)."""
        sampled = Batches(batches, [[i] for i in range(len(batches))],
                          lambda group, _: self.sample(model, group[0], dist_.device, greedy=True))
        return {"eval_reverse_kl": evaluate_loss(model, sampled, dist_, vocab, autocast, loss=LOSS)}
