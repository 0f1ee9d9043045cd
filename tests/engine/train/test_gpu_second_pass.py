"""Issue #25 (GPU first run, second pass): MFU against the compute dtype's peak, the DPO / distillation heads in
the autocast dtype, frozen models freed without waiting for a garbage collection, LoRA's base loaded sharded."""
import contextlib
import gc
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from qwen3_fixtures import TINY_QWEN3, save_chat_checkpoint
from tiny_run import tiny_overrides, tiny_run_files  # noqa: F401 (fixture)

from qforge.engine.config import Qwen3Config
from qforge.engine.config_io import load_config
from qforge.engine.data import ChatTemplate, PackedBatch
from qforge.engine.model import Qwen3
from qforge.engine.train import FFTConfig, train
from qforge.engine.train import metrics
from qforge.engine.train.build import release
from qforge.engine.train.parallel import Dist


@contextlib.contextmanager
def gc_disabled():
    """Nothing may be freed by a collection that happens to run: only reference counting frees."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_mfu_is_measured_against_the_peak_of_the_dtype_the_matmuls_run_in(tiny_run_files, tmp_path, monkeypatch):
    """bf16-mixed on one device runs its matmuls in bf16 (autocast); the peak probe (a CPU stand-in here: fp32 at
    1/15 of bf16, as on an H100 with TF32 off) was asked for fp32, so MFU exceeded 1, was re-measured three times
    and then logged as null every step."""
    asked = []
    peaks = {torch.bfloat16: 1e15, torch.float32: 1e15 / 15}

    def probe(device, dtype):
        asked.append(dtype)
        return peaks[dtype]

    monkeypatch.setattr(metrics, "measure_matmul_peak", probe)
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(FFTConfig, None, tiny_overrides(tiny_run_files, tmp_path / "out", **{
        "train.precision": "bf16-mixed", "train.max_steps": 2}))
    train(config)
    records = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert asked == [torch.bfloat16]  # once, at start: no re-measurement
    for record in steps:
        flops_per_s = record["mfu"] * peaks[torch.bfloat16]
        assert 0 < record["mfu"] < 1 and flops_per_s > 0
    assert metrics.matmul_dtype("fp32") == torch.float32 and metrics.matmul_dtype("bf16") == torch.bfloat16
    # the allocator setting the twin's memory figures assume, set by train() when the environment leaves it unset
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_an_explicit_allocator_setting_is_kept(monkeypatch):
    from qforge.engine.train.build import default_allocator_settings

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    default_allocator_settings()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"


def _tiny_model():
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config(**TINY_QWEN3))
    model.init_weights(seed=0)
    return model.train()


def _packed(n=24, vocab=TINY_QWEN3["vocab_size"]):
    ids = torch.arange(n) % vocab
    labels = torch.roll(ids, -1)
    labels[-1] = -100
    return PackedBatch(ids, torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n, labels, torch.ones(n))


def test_dpo_and_distillation_heads_run_in_the_autocast_dtype(monkeypatch):
    """One GPU, bf16-mixed (autocast): like SFT's `Qwen3.loss`, DPO's sequence log-probs and both distillation
    losses hand the fused kernel a bf16 head (it was the fp32 master weight: an fp32 head matmul)."""
    from qforge.engine.train import distill, dpo

    seen = []

    def recording(kernel):
        def call(hidden, weight, labels, **kwargs):
            seen.append((kernel.__name__, hidden.dtype, weight.dtype))
            return kernel(hidden, weight, labels, **kwargs)
        return call

    monkeypatch.setattr(dpo, "fused_linear_cross_entropy", recording(dpo.fused_linear_cross_entropy))
    monkeypatch.setattr(distill, "fused_linear_kl", recording(distill.fused_linear_kl))
    model, teacher = _tiny_model(), _tiny_model().to(torch.bfloat16).requires_grad_(False)
    packed = _packed()
    k = 4
    top = distill.DistillBatch(packed, torch.randint(0, TINY_QWEN3["vocab_size"], (packed.num_tokens, k)),
                               torch.randn(packed.num_tokens, k).log_softmax(-1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dpo.sequence_logps(model, packed).sum().backward()
        distill.student_kl_loss(model, top).backward()
        distill.student_kl_loss(model, packed, teacher=teacher, direction="reverse").backward()
    assert seen == [("fused_linear_cross_entropy", torch.bfloat16, torch.bfloat16),
                    ("fused_linear_kl", torch.bfloat16, torch.bfloat16),
                    ("fused_linear_kl", torch.bfloat16, torch.bfloat16)]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_chat_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher", seed=5)


def test_off_policy_teacher_is_freed_when_scoring_is_done(tiny_run_files, teacher_dir, tmp_path, monkeypatch):
    """The teacher that scored the data is gone the moment `load_data` returns, with garbage collection off: its
    bound `score` method (and, sharded, FSDP2's state) kept it in a reference cycle until the next full GC."""
    import qforge.engine.train.distill as distill
    from qforge.recipes.distill import DistillConfig

    rows = Path(tiny_run_files["train"]).read_text(encoding="utf-8").splitlines(True)[:2]
    (tmp_path / "train.jsonl").write_text("".join(rows), encoding="utf-8")
    files = {**tiny_run_files, "train": str(tmp_path / "train.jsonl")}
    config = load_config(DistillConfig, None, tiny_overrides(files, tmp_path / "out", **{
        "distill.teacher": str(teacher_dir), "distill.top_k": 4, "data.max_tokens": 768}))
    loaded = []

    def load_teacher(*args, **kwargs):
        teacher = original(*args, **kwargs)
        loaded.append(weakref.ref(teacher))
        return teacher

    original = distill.load_teacher
    monkeypatch.setattr(distill, "load_teacher", load_teacher)
    objective = distill.OffPolicyDistill(str(teacher_dir), top_k=4)
    with gc_disabled():
        datasets, _, _ = objective.load_data(config, ChatTemplate.from_pretrained(teacher_dir), Dist())
        assert len(loaded) == 1 and loaded[0]() is None
    assert len(datasets[0]) == 2 and datasets[0][0].ids.shape[1] == 4


def test_release_returns_a_sharded_frozen_models_memory():
    """FSDP2 (a one-rank fake process group): the module stays alive in FSDP's reference cycles after it is
    dropped, so `release` empties its shards in place; the bytes are back without a collection."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from qforge.engine.train.build import freeze
    from qforge.engine.model import bind_forward_method
    from qforge.engine.train.parallel import shard_model

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        model = _tiny_model()
        shard_model(model, None, mesh=init_device_mesh("cpu", (1,)))
        freeze(model)
        bind_forward_method(model, "score", lambda m, ids: Qwen3.hidden(m, ids))
        shards = [p.to_local().untyped_storage() for p in model.parameters()]
        assert sum(s.nbytes() for s in shards) > 0
        alive = weakref.ref(model)
        with gc_disabled():
            del model
            assert alive() is not None  # FSDP2's state holds it in a cycle: dropping it frees nothing
            release(alive())
            assert sum(s.nbytes() for s in shards) == 0
            assert "score" not in vars(alive())
    finally:
        dist.destroy_process_group()


def test_lora_loads_its_base_sharded_with_the_adapters_of_a_single_process(tmp_path, monkeypatch):
    """Under FSDP2 (rank 0 of a two-rank fake process group) LoRA's base is read like full fine-tuning's: no full
    `load_model` per rank, each rank's shards hold its rows of the checkpoint, and the adapters hold the rows of
    exactly what one process initialises (A drawn from the seed, B zero)."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from qforge.engine import checkpoint
    from qforge.engine.lora import LoRASettings
    from qforge.engine.train import build
    from qforge.engine.train.config import ModelSettings
    from qforge.engine.train.parallel import shard_model
    from qwen3_fixtures import save_hf_qwen3

    path = save_hf_qwen3(tmp_path / "base", seed=3)
    settings, lora = ModelSettings(path=str(path)), LoRASettings(rank=4, target_modules=["q_proj", "down_proj"])
    single = build.build_lora_model(settings, lora, 7, torch.float32, torch.device("cpu"))
    expected = {name: p.detach().clone() for name, p in single.named_parameters()}
    full_loads = []
    monkeypatch.setattr(build, "load_model", lambda *a, **k: full_loads.append(a) or checkpoint.load_model(*a, **k))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        model = build.build_lora_model(settings, lora, 7, torch.float32, torch.device("cpu"),
                                       shard=lambda m: shard_model(m, None, mesh=mesh))
        assert not full_loads
        stored = load_file(path / "model.safetensors")
        assert stored  # the oracle: the safetensors rows, independently of qforge's loader
        for name, param in model.named_parameters():
            local, rows = param.to_local(), build._global_rows(param)
            assert local.shape[0] == (expected[name].shape[0] + 1) // 2, name  # rank 0's half of the rows
            torch.testing.assert_close(local, expected[name][rows], atol=0, rtol=0, msg=name)
            if ".lora_" not in name:
                key = name if name.startswith("lm_head") else f"model.{name}"
                torch.testing.assert_close(local, stored[key][rows].float(), atol=0, rtol=0, msg=name)
        assert sum(".lora_B" in n for n, _ in model.named_parameters()) == 2 * TINY_QWEN3["num_hidden_layers"]
        assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    finally:
        dist.destroy_process_group()
