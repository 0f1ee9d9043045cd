"""Full fine-tuning: typed settings, the packed-batch loop, FSDP2, exact-resume checkpoints."""
from .config import FFTConfig
from .loop import EvalPoint, NonFiniteLossError, TrainResult, evaluate_loss, train, train_step

__all__ = ["EvalPoint", "FFTConfig", "NonFiniteLossError", "TrainResult", "evaluate_loss", "train", "train_step"]
