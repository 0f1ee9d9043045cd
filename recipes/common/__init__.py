"""What every recipe shares: the command line (`--config FILE [key=value ...]`), model endpoints, JSONL files."""
