"""Examples and batches: the synthetic task, files, padding, and step-indexed shuffling."""

import json

import numpy as np
import pytest

from encdec.config import ModelConfig
from encdec.lora.data import DataConfig, batch_indices, load_examples, load_splits, make_batch, reverse_task
from tests.lora import strict_rank_promotion  # noqa: F401 (autouse)

CFG = ModelConfig.from_hf(
    {
        "model_type": "t5",
        "vocab_size": 32,
        "d_model": 8,
        "d_kv": 4,
        "d_ff": 8,
        "num_layers": 1,
        "num_heads": 2,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }
)


def test_reverse_task_examples_are_distinct_reversals():
    examples = reverse_task(200, min_len=3, max_len=6, low=3, high=9, eos=1, seed=0)
    assert len({tuple(s) for s, _ in examples}) == 200
    for source, target in examples:
        assert source[-1] == target[-1] == 1 and 3 <= len(source) - 1 <= 6
        assert target[:-1] == source[:-1][::-1]
        assert all(3 <= t < 9 for t in source[:-1])
    with pytest.raises(ValueError, match="only 12 distinct"):
        reverse_task(13, min_len=1, max_len=2, low=3, high=6, eos=1, seed=0)
    with pytest.raises(ValueError, match="EOS id 4"):
        reverse_task(3, min_len=1, max_len=2, low=3, high=6, eos=4, seed=0)


def test_splits_are_disjoint_and_check_the_vocabulary():
    train, held = load_splits(DataConfig(num_train=100, num_eval=20), CFG)
    assert len(train) == 100 and len(held) == 20
    assert not {tuple(s) for s, _ in train} & {tuple(s) for s, _ in held}
    with pytest.raises(ValueError, match="data.token_high: 40 exceeds the vocabulary"):
        load_splits(DataConfig(token_high=40), CFG)
    with pytest.raises(ValueError, match="special ids"):
        load_splits(DataConfig(token_low=0, token_high=9), CFG)


def test_make_batch_pads_and_shifts_the_decoder_input():
    batch = make_batch([([5, 6, 1], [6, 5, 1]), ([7, 1], [9, 8, 7, 1])], CFG, source_len=4, target_len=5)
    np.testing.assert_array_equal(batch["source_ids"], [[5, 6, 1, 0], [7, 1, 0, 0]])
    np.testing.assert_array_equal(batch["source_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["labels"], [[6, 5, 1, 0, 0], [9, 8, 7, 1, 0]])
    np.testing.assert_array_equal(batch["label_mask"], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["decoder_ids"], [[0, 6, 5, 0, 0], [0, 9, 8, 7, 0]])
    with pytest.raises(ValueError, match="example 1 has 4 target tokens; max_target_len is 3"):
        make_batch([([5, 1], [5, 1]), ([7, 1], [9, 8, 7, 1])], CFG, source_len=4, target_len=3)


def test_batches_are_a_function_of_the_step_and_cover_each_epoch():
    n, bs, accum = 10, 3, 2
    again = batch_indices(n, 4, bs, accum, seed=1)
    np.testing.assert_array_equal(batch_indices(n, 4, bs, accum, seed=1), again)
    assert again.shape == (accum, bs)
    flat = np.concatenate([batch_indices(n, s, bs, accum, seed=1).ravel() for s in range(5)])  # 30 = 3 epochs
    for epoch in range(3):
        assert sorted(flat[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert list(flat[:n]) != list(flat[n : 2 * n])  # a fresh order each epoch
    # Accumulating k micro-batches of b reads the same examples as one batch of k*b.
    np.testing.assert_array_equal(
        batch_indices(n, 3, 3, 2, seed=1).ravel(), batch_indices(n, 3, 6, 1, seed=1).ravel()
    )


class _CharTokenizer:
    """Stands in for an HF tokenizer: one id per character, then EOS."""

    def __call__(self, text=None, text_target=None):
        s = text if text is not None else text_target
        return {"input_ids": [3 + ord(c) - ord("a") for c in s] + [1]}


def test_jsonl_and_csv_files(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        json.dumps({"source": [5, 6, 1], "target": [6, 5]})
        + "\n\n"
        + json.dumps({"source": "ab", "target": "ba"})
    )
    with pytest.raises(ValueError, match="d.jsonl:3: text needs the model's tokenizer"):
        load_examples(jsonl, CFG)
    examples = load_examples(jsonl, CFG, _CharTokenizer())
    assert examples == [([5, 6, 1], [6, 5, 1]), ([3, 4, 1], [4, 3, 1])]  # EOS appended to the id target
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("source,target\n5 6 1,6 5 1\n7 1,7\n")
    assert load_examples(csv_file, CFG) == [([5, 6, 1], [6, 5, 1]), ([7, 1], [7, 1])]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": [1]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected an object with 'source' and 'target'"):
        load_examples(bad, CFG)
    (tmp_path / "d.txt").write_text("")
    with pytest.raises(ValueError, match="unknown data format '.txt'"):
        load_examples(tmp_path / "d.txt", CFG)
