"""The cases of test_distill_distributed.py: each runs on 2 gloo ranks under torchrun (sharded student and teacher)
and, for the reference, in the test's own process (one rank, unsharded, replicated teacher) on the same inputs.

    distill_distributed_worker.py <case file (JSON)> <result dir>
"""
import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

EOS = 7  # the stop id of the on-policy samples (a random tiny model rarely samples it: most completions are cut)
CONFIG = SimpleNamespace(train=SimpleNamespace(precision="fp32"), data=SimpleNamespace(max_tokens=48),
                         output=SimpleNamespace(progress=False))


def _prompt_batch(prompts, seed):
    from qforge.engine.data.prompts import Prompt, PromptBatch

    return PromptBatch([Prompt(np.array(p, dtype=np.int32), np.array(p, dtype=np.int32), 0) for p in prompts], seed)


def load_student(path, dist_):
    from qforge.engine.train.build import build_model
    from qforge.engine.train.config import ModelSettings
    from qforge.engine.train.parallel import shard_model

    shard = (lambda m: shard_model(m, None, dist_.device)) if dist_.enabled else None
    return build_model(ModelSettings(path=str(path)), torch.float32, dist_.device, shard=shard)


class AllGathers:
    """Counts the collectives FSDP2 gathers parameters with (torch 2.13: `all_gather_single`) inside the block."""
    NAME = "all_gather_single"

    def __enter__(self):
        import torch.distributed as dist

        self.count, self._original = 0, getattr(dist, self.NAME)

        def counting(*args, **kwargs):
            self.count += 1
            return self._original(*args, **kwargs)

        setattr(dist, self.NAME, counting)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        setattr(dist, self.NAME, self._original)


def generation(case, dist_, ranks):
    """Greedy and seeded-sampled completions of each of `ranks`' prompts (its own max_new_tokens), sharded
    parameters gathered per forward and (`gathered`) kept gathered, with the all-gathers each ran."""
    from torch.distributed.tensor import DTensor

    from qforge.engine.generate import gathered, generate

    model = load_student(case["student"], dist_)
    out = {}
    for rank in ranks:
        settings = dict(max_new_tokens=case["max_new_tokens"][rank], stop_ids=case["stop_ids"])
        with AllGathers() as per_step:
            greedy = generate(model, case["prompts"][rank], **settings)
        sampled = generate(model, case["prompts"][rank], temperature=1.0, seed=11 + rank, **settings)
        with AllGathers() as once, gathered(model):
            kept = generate(model, case["prompts"][rank], **settings)
            gathered_inside = not any(isinstance(p, DTensor) for p in model.layers.parameters())
        out[rank] = {"greedy": greedy, "sampled": sampled, "greedy_gathered": kept,
                     "all_gathers": [per_step.count, once.count], "gathered_inside": gathered_inside,
                     "sharded_after": all(isinstance(p, DTensor) for p in model.layers.parameters())}
    return out


def on_policy_step(case, dist_, ranks):
    """One on-policy step (sampling, sharded teacher scoring, reverse KL backward) over `ranks`' micro-batches:
    (samples, loss sum, weight, full gradients, teacher bytes on this rank, full teacher bytes, sharded after)."""
    from torch.distributed.tensor import DTensor

    from qforge.engine.train.distill import OnPolicyDistill

    model = load_student(case["student"], dist_)
    objective = OnPolicyDistill(case["teacher"], max_new_tokens=case["on_policy_new_tokens"])
    objective.template = SimpleNamespace(eos_id=EOS)
    objective.prepare(model, CONFIG, None, dist_, None)
    sampled = [objective.sample(model, _prompt_batch(case["prompts"][r], 100 + r), dist_.device, greedy=False)
               for r in ranks]
    step = objective.learn(model, sampled, dist_, None, contextlib.nullcontext)
    loss_sum, weight = step.loss_sum, step.weight
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for name, p in model.named_parameters()}
    teacher = list(objective.teacher.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in teacher)
    return {"samples": [s.input_ids.tolist() for s in sampled], "loss_sum": loss_sum, "weight": weight,
            "grads": grads, "teacher_local_bytes": local,
            "teacher_bytes": sum(p.numel() * p.element_size() for p in teacher),
            "teacher_sharded_after_step": all(isinstance(p, DTensor) for p in teacher),
            "teacher_requires_grad": any(p.requires_grad for p in teacher)}


def off_policy_examples():
    """Twelve sequences of 5–19 tokens, supervised after a 3-token prompt: with data.max_tokens=48 they make
    more teacher groups than ranks and an odd count, so one rank pads with an idle forward."""
    from qforge.engine.data.example import make_example

    rng = np.random.default_rng(3)
    return [make_example(rng.integers(8, 500, size=n), np.arange(n) >= 3) for n in rng.integers(5, 20, size=12)]


def off_policy_store(case, dist_, directory):
    """The stored top-k (ids, log-probs, offsets) of `off_policy_examples` with the local teacher."""
    from qforge.engine.train.distill import OffPolicyDistill

    objective = OffPolicyDistill(case["teacher"], top_k=5)
    objective._targets(off_policy_examples(), Path(directory), CONFIG, None, dist_)  # no template: local teacher
    (stored,) = [p for p in Path(directory).iterdir() if not p.name.startswith(".")]
    return {name: np.load(stored / f"{name}.npy") for name in ("ids", "logprobs", "offsets")}


def main(case_file, results):
    import torch.distributed as dist

    from qforge.engine.train.parallel import init_distributed

    case = json.loads(Path(case_file).read_text())
    dist_ = init_distributed("cpu", timeout_s=120)
    results = Path(results)
    generated = generation(case, dist_, [dist_.rank])
    step = on_policy_step(case, dist_, [dist_.rank])
    store = off_policy_store(case, dist_, results / "store")
    torch.save({"generation": generated, "on_policy": step, "store": store if dist_.is_main else None},
               results / f"rank-{dist_.rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
