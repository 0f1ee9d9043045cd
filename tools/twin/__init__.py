"""GPU twin: the trainer's own step at real Qwen3 shapes on fake GPU tensors over a fake process group
(see run.py for what runs, fake_cuda.py for how the GPU is faked, contracts.py for the library checks)."""
from .run import TwinPlan, run_twin

__all__ = ["TwinPlan", "run_twin"]
