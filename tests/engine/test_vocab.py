"""VocabMap: the original ↔ kept id maps, label checks, and the restricted loss through `vocab_index`."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from vocab_fixtures import QWEN_ROWS, vocab_map  # noqa: F401  (fixture)

from qforge.engine.errors import ConfigError, DataError
from qforge.engine.vocab import VocabMap, read_suppress_ids, scan_tokenizer
from qforge.kernels import fused_linear_cross_entropy


def test_maps_are_inverse_and_dense(vocab_map, qwen_tokenizer_dir):
    scan = scan_tokenizer(qwen_tokenizer_dir)
    kept = sorted(scan.classes["other"] + scan.classes["special"])
    assert vocab_map.kept_ids.tolist() == kept and vocab_map.new_size == len(kept)
    old_to_new = vocab_map.old_to_new
    assert old_to_new.shape == (QWEN_ROWS,)
    assert torch.equal(old_to_new[vocab_map.kept_ids], torch.arange(len(kept)))
    removed = scan.classes["cjk"] + scan.classes["cjk_bytes"] + list(range(scan.size, QWEN_ROWS))
    assert (old_to_new[removed] == -1).all() and int((old_to_new == -1).sum()) == len(removed)
    assert torch.isin(vocab_map.suppress_ids, vocab_map.kept_ids).all()
    assert vocab_map.to_new(torch.tensor([151645])).item() == len(kept) - 24  # <|im_end|>, third added token


def test_to_new_rejects_removed_ids(vocab_map, qwen_tokenizer_dir):
    han = scan_tokenizer(qwen_tokenizer_dir).classes["cjk"][0]
    with pytest.raises(ValueError, match=f"{han}.*removed"):
        vocab_map.to_new(torch.tensor([0, han]))


def test_labels_with_removed_tokens_raise_with_counts_or_are_masked(vocab_map, qwen_tokenizer_dir):
    han = scan_tokenizer(qwen_tokenizer_dir).classes["cjk"][:3]
    labels = np.array([-100, 15, han[0], 16, han[1], han[1], -100, 151645, QWEN_ROWS], dtype=np.int32)
    with pytest.raises(DataError, match=r"4 label tokens \(3 distinct ids.*drop_unkept_labels"):
        vocab_map.check_labels([labels], drop=False)
    assert vocab_map.check_labels([labels], drop=True) == 4
    masked = vocab_map.mask_labels(labels)
    assert masked.tolist() == [-100, 15, -100, 16, -100, -100, -100, 151645, -100] and masked.dtype == labels.dtype
    assert vocab_map.check_labels([masked], drop=False) == 0
    assert vocab_map.mask_labels(masked) is masked  # nothing to mask: no copy


def test_restricted_fused_loss_equals_cross_entropy_over_kept_rows(vocab_map):
    torch.manual_seed(0)
    tokens, hidden_size = 12, 16
    hidden = torch.randn(tokens, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(QWEN_ROWS, hidden_size, dtype=torch.float64, requires_grad=True)
    labels = vocab_map.kept_ids[torch.randint(0, vocab_map.new_size, (tokens,))]
    labels[3] = -100
    vocab_index, target_index = vocab_map.loss_tables(torch.device("cpu"))
    loss = fused_linear_cross_entropy(hidden, weight, labels, vocab_index=vocab_index, target_index=target_index,
                                      reduction="sum")
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
    with pytest.raises(ConfigError, match="original_size"):
        VocabMap.load(path)
    assert VocabMap.load(path, original_size=8).suppress_tokens == [0, 3, 4, 5, 6, 7]
    with pytest.raises(ConfigError, match="written for a vocabulary of 151936 rows but the model has 8"):
        vocab_map.save(path) or VocabMap.load(path, original_size=8)


@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", 'bare JSON list does not say what it holds; write {"kept_ids": \\[...\\]}'),
    ("{not json", "invalid JSON"),
    ('{"ids": [1]}', 'expected a JSON object with "kept_ids" or "suppress_ids"'),
    ('{"kept_ids": ["a"]}', '"kept_ids" must be a list of non-negative integer'),
    ('{"suppress_ids": [1]}', 'holds "suppress_ids" only'),
])
def test_token_id_files_say_what_they_hold(tmp_path, content, message):
    path = tmp_path / "ids.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        VocabMap.load(path, original_size=8)


def test_suppress_ids_come_from_a_suppress_file_or_a_kept_set(tmp_path):
    VocabMap(torch.arange(10), torch.tensor([3]), original_size=16).save(tmp_path / "kept.json")
    assert read_suppress_ids(tmp_path / "kept.json") == [3, 10, 11, 12, 13, 14, 15]
    (tmp_path / "suppress.json").write_text('{"suppress_ids": [9, 5]}')
    assert read_suppress_ids(tmp_path / "suppress.json") == [5, 9]
    (tmp_path / "bare.json").write_text("[5, 9]")
    with pytest.raises(ConfigError, match="bare.json: a bare JSON list"):
        read_suppress_ids(tmp_path / "bare.json")


def test_restrict_builds_the_kept_set_once(tmp_path):
    assert VocabMap.from_restrict("all", 16) is None
    labels = [np.array([-100, 4, 7], dtype=np.int32), np.array([7, 2], dtype=np.int32)]
    data = VocabMap.from_restrict("data", 16, labels, special_ids=[15])
    assert data.kept_ids.tolist() == [2, 4, 7, 15] and data.original_size == 16
    with pytest.raises(ConfigError, match="vocab.restrict='nope' is neither 'all', 'data' nor"):
        VocabMap.from_restrict("nope", 16)


def test_invalid_maps_are_rejected():
    with pytest.raises(ValueError, match="does not fit a vocabulary of 10 rows"):
        VocabMap(torch.tensor([1, 12]), torch.tensor([], dtype=torch.long), 10)
    with pytest.raises(ValueError, match="strictly increasing"):
        VocabMap(torch.tensor([2, 1]), torch.tensor([], dtype=torch.long), 10)
    with pytest.raises(ValueError, match="subset"):
        VocabMap(torch.tensor([1, 2]), torch.tensor([3]), 10)
