"""The trainer: typed settings, one loop for every objective (SFT by default), FSDP2, exact-resume checkpoints."""
from .config import FFTConfig
from .loop import EvalPoint, NonFiniteLossError, TrainResult, train
from .objective import Objective, Step
from .sft import SFT, evaluate_loss, train_step

__all__ = ["EvalPoint", "FFTConfig", "NonFiniteLossError", "Objective", "SFT", "Step", "TrainResult",
           "evaluate_loss", "train", "train_step"]
