"""GPU twin: the trainer's own step at real Qwen3 shapes on fake GPU tensors over a fake process group
(see run.py for what runs, fake_cuda.py for how the GPU is faked, contracts.py for the library checks), and
the same for sharded loading (load.py), the exports and checkpoint state (export.py); collectives.py compares
every rank's collectives."""
from .run import TwinPlan, run_twin

__all__ = ["TwinPlan", "run_twin"]
