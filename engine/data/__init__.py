"""SFT data: reading chat files, the Qwen3 chat template with assistant-only labels, and sequence packing."""
from .cache import LoadSummary, TokenizeSettings, load_examples
from .example import IGNORE_INDEX, LOSS_WEIGHTINGS, Example, loss_weights
from .formats import DataError, SkippedRow, read_conversations
from .packing import Batches, PackedBatch, PackReport, pack, pack_items
from .template import ChatTemplate

__all__ = ["IGNORE_INDEX", "LOSS_WEIGHTINGS", "Batches", "ChatTemplate", "DataError", "Example", "LoadSummary",
           "PackReport", "PackedBatch", "SkippedRow", "TokenizeSettings", "load_examples", "loss_weights", "pack",
           "pack_items", "read_conversations"]
