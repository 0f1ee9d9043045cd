"""recipes/prune.py prunes to the vocabulary the model was trained on (final/kept_ids.json), not a re-derived one."""
import json

from qforge.engine.vocab import KEPT_IDS_FILE, VocabMap
from qforge.recipes.prune import kept_vocabulary

ROWS = 151936


def test_prune_reads_the_kept_set_saved_with_the_model(tmp_path, qwen_tokenizer_dir):
    model_dir = tmp_path / "final"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": ROWS}))
    trained = VocabMap.from_ids([0, 5, 9, 151645], ROWS)  # e.g. vocab.restrict=data: not the CJK-free set
    trained.save_with_model(model_dir)
    vocab = kept_vocabulary(model_dir, qwen_tokenizer_dir)
    assert vocab.kept_ids.tolist() == [0, 5, 9, 151645] and vocab.original_size == ROWS

    (model_dir / KEPT_IDS_FILE).unlink()  # trained on the full vocabulary: the tokenizer's CJK-free set
    assert kept_vocabulary(model_dir, qwen_tokenizer_dir).kept_ids.tolist() == \
        VocabMap.from_tokenizer(qwen_tokenizer_dir, ROWS).kept_ids.tolist()
