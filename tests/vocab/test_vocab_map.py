"""VocabMap: the original ↔ kept id maps, label checks, and the restricted loss through `vocab_index`."""
import json

import pytest
import torch
import torch.nn.functional as F
from vocab_fixtures import QWEN_ROWS, vocab_map  # noqa: F401  (fixture)

from qforge.engine.vocab import VocabMap, scan_tokenizer
from qforge.kernels import fused_linear_cross_entropy


def test_maps_are_inverse_and_dense(vocab_map, qwen_tokenizer_dir):
    scan = scan_tokenizer(qwen_tokenizer_dir)
    kept = sorted(scan.classes["other"] + scan.classes["special"])
    assert vocab_map.kept_ids.tolist() == kept and vocab_map.new_size == len(kept)
    old_to_new = vocab_map.old_to_new
    assert old_to_new.shape == (QWEN_ROWS,)
    assert torch.equal(old_to_new[vocab_map.new_to_old], torch.arange(len(kept)))
    removed = scan.classes["cjk"] + scan.classes["cjk_bytes"] + list(range(scan.size, QWEN_ROWS))
    assert (old_to_new[removed] == -1).all() and int((old_to_new == -1).sum()) == len(removed)
    assert torch.isin(vocab_map.suppress_ids, vocab_map.kept_ids).all()
    assert vocab_map.to_new(torch.tensor([151645])).item() == len(kept) - 24  # <|im_end|>, third added token


def test_to_new_rejects_removed_ids(vocab_map, qwen_tokenizer_dir):
    han = scan_tokenizer(qwen_tokenizer_dir).classes["cjk"][0]
    with pytest.raises(ValueError, match=f"{han}.*removed"):
        vocab_map.to_new(torch.tensor([0, han]))


def test_labels_with_removed_tokens_raise_with_counts_or_are_dropped(vocab_map, qwen_tokenizer_dir):
    han = scan_tokenizer(qwen_tokenizer_dir).classes["cjk"][:3]
    labels = torch.tensor([-100, 15, han[0], 16, han[1], han[1], -100, 151645])
    with pytest.raises(ValueError, match="3 of 6 label tokens are removed"):
        vocab_map.check_labels(labels)
    cleaned, dropped = vocab_map.check_labels(labels, drop=True)
    assert dropped == 3
    assert cleaned.tolist() == [-100, 15, -100, 16, -100, -100, -100, 151645]
    again, count = vocab_map.check_labels(cleaned)
    assert count == 0 and torch.equal(again, cleaned)
    with pytest.raises(ValueError, match="outside"):
        vocab_map.check_labels(torch.tensor([QWEN_ROWS]))


def test_restricted_fused_loss_equals_cross_entropy_over_kept_rows(vocab_map):
    torch.manual_seed(0)
    tokens, hidden_size = 12, 16
    hidden = torch.randn(tokens, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(QWEN_ROWS, hidden_size, dtype=torch.float64, requires_grad=True)
    labels = vocab_map.kept_ids[torch.randint(0, vocab_map.new_size, (tokens,))]
    labels[3] = -100
    loss = fused_linear_cross_entropy(hidden, weight, labels, vocab_index=vocab_map.kept_ids,
                                      target_index=vocab_map.old_to_new, reduction="sum")
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    keep = labels != -100
    logits = hidden @ weight[vocab_map.kept_ids].T
    expected = F.cross_entropy(logits[keep], vocab_map.to_new(labels[keep]), reduction="sum")
    expected.backward()
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-5)
    assert torch.allclose(grads[1], weight.grad, atol=1e-5)
    removed_rows = torch.ones(QWEN_ROWS, dtype=torch.bool).index_fill_(0, vocab_map.kept_ids, False)
    assert grads[1][removed_rows].abs().max() == 0  # removed rows are never scored


def test_save_and_load_round_trip(vocab_map, tmp_path):
    path = tmp_path / "kept_ids.json"
    vocab_map.save(path, tokenizer="qwen3")
    loaded = VocabMap.load(path)
    assert torch.equal(loaded.kept_ids, vocab_map.kept_ids) and torch.equal(loaded.suppress_ids, vocab_map.suppress_ids)
    assert loaded.original_size == QWEN_ROWS and json.loads(path.read_text())["tokenizer"] == "qwen3"
    path.write_text(json.dumps({"kept_ids": [1, 2]}))
    with pytest.raises(ValueError, match="missing fields.*vocab_report"):
        VocabMap.load(path)


def test_invalid_maps_are_rejected():
    with pytest.raises(ValueError, match="does not fit a vocabulary of 10 rows"):
        VocabMap(torch.tensor([1, 12]), torch.tensor([], dtype=torch.long), 10)
    with pytest.raises(ValueError, match="strictly increasing"):
        VocabMap(torch.tensor([2, 1]), torch.tensor([], dtype=torch.long), 10)
    with pytest.raises(ValueError, match="subset"):
        VocabMap(torch.tensor([1, 2]), torch.tensor([3]), 10)
