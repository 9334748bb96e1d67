"""The data pipeline: every source kind, token files, the token stream and its held-out split,
packed training batches (windows, determinism, epochs, ranks, varlen, resume checks) and
evaluation batches."""

from __future__ import annotations

import json
import math
import sys
import types
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch

from memzoo.train.data import (
    PackedBatches,
    build_token_stream,
    eval_batches,
    is_token_file,
    load_documents,
    load_token_file,
    save_token_file,
    split_heldout,
)
from memzoo.train.tokenizer import ByteTokenizer

EOS = 256


def stream_of(lengths: list[int], *, seed: int = 0, eos_id: int = EOS) -> np.ndarray:
    """Documents of the given lengths (eos included): random ids below 200, each ended by eos."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, 200, n - 1), eos_id) for n in lengths]
    return np.concatenate(docs).astype(np.uint16)


def doc_starts(tokens: np.ndarray, eos_id: int = EOS) -> list[int]:
    """Every position right after an eos, inside the stream."""
    return [i + 1 for i in np.flatnonzero(tokens[:-1] == eos_id).tolist()]


# --------------------------------------------------------------------------------------
# Sources -> documents
# --------------------------------------------------------------------------------------


def test_builtin_corpus_is_the_pydoc_topics_in_sorted_order():
    docs = list(load_documents("builtin"))
    assert docs == [topics[name] for name in sorted(topics)]
    assert sum(len(d) for d in docs) > 400_000
    assert list(load_documents("pydoc")) == docs
    assert list(load_documents("builtin")) == docs


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("first line\nsecond line — ünïcode\n", encoding="utf-8")
    assert list(load_documents(str(path))) == ["first line\nsecond line — ünïcode\n"]


def test_text_file_with_invalid_utf8_is_replaced(tmp_path):
    path = tmp_path / "bytes.txt"
    path.write_bytes(b"ok \xff end")
    assert list(load_documents(str(path))) == ["ok \ufffd end"]


def test_jsonl_is_one_document_per_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"text": "alpha", "id": 1}, {"text": "beta\nwith newline"}, {"text": "gamma"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert list(load_documents(str(path))) == ["alpha", "beta\nwith newline", "gamma"]


def test_jsonl_custom_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "one"}\n{"body": "two", "text": "ignored"}\n')
    assert list(load_documents(str(path), text_field="body")) == ["one", "two"]


def test_jsonl_line_without_the_field_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    docs = load_documents(str(path))
    assert next(docs) == "fine"
    with pytest.raises(ValueError, match=r"docs\.jsonl, line 2: no string field 'text'"):
        next(docs)


def test_jsonl_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl, line 3: not valid JSON"):
        list(load_documents(str(path)))


def test_directory_reads_text_files_recursively_in_path_order(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a" / "c.md").write_text("a/c")
    (tmp_path / "a" / "deep" / "d.rst").write_text("a/deep/d")
    (tmp_path / "z.jsonl").write_text('{"text": "z1"}\n{"text": "z2"}\n')
    (tmp_path / "a" / "skipped.py").write_text("not a text source")
    (tmp_path / "empty.txt").write_text("")
    assert list(load_documents(str(tmp_path))) == ["a/c", "a/deep/d", "b", "z1", "z2"]


def test_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing-here.*no such file or directory"):
        load_documents(str(tmp_path / "nothing-here"))


def test_directory_without_text_files_is_an_error(tmp_path):
    (tmp_path / "code.py").write_text("print()")
    with pytest.raises(ValueError, match=r"no \.txt, \.md, \.rst or \.jsonl files"):
        load_documents(str(tmp_path))


def test_source_with_only_empty_documents_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match=r"holds no text"):
        list(load_documents(str(tmp_path)))


def test_token_file_is_not_a_text_source(tmp_path):
    path = save_token_file(tmp_path / "tokens.bin", np.arange(4, dtype=np.uint16))
    assert is_token_file(path) and not is_token_file("builtin")
    with pytest.raises(ValueError, match=r"is a token file: read it with load_token_file"):
        load_documents(str(path))


def test_hf_source_without_datasets_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs the `datasets` package"):
        load_documents(f"hf:{tmp_path}")


class _SavedDataset:
    """The two parts of datasets.Dataset that the hf source uses."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.column_names = list(columns)

    def iter(self, batch_size: int):
        rows = len(next(iter(self.columns.values())))
        for first in range(0, rows, batch_size):
            yield {k: v[first : first + batch_size] for k, v in self.columns.items()}


def _fake_datasets(monkeypatch, saved) -> list[str]:
    opened = []

    def load_from_disk(path):
        opened.append(path)
        return saved

    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_from_disk=load_from_disk)
    )
    return opened


def test_hf_source_reads_the_text_column_of_the_train_split(monkeypatch, tmp_path):
    texts = [f"document {i}" for i in range(2500)]
    splits = {
        "train": _SavedDataset({"text": texts, "id": list(range(2500))}),
        "test": _SavedDataset({"text": ["held out"]}),
    }
    opened = _fake_datasets(monkeypatch, splits)
    assert list(load_documents(f"hf:{tmp_path}")) == texts
    assert opened == [str(tmp_path)]


def test_hf_source_missing_column_lists_the_columns(monkeypatch, tmp_path):
    _fake_datasets(monkeypatch, _SavedDataset({"content": ["x"], "id": [0]}))
    with pytest.raises(ValueError, match=r"no column 'text'; columns: content, id"):
        load_documents(f"hf:{tmp_path}")


def test_hf_source_missing_path_is_an_error(monkeypatch, tmp_path):
    _fake_datasets(monkeypatch, _SavedDataset({"text": ["x"]}))
    with pytest.raises(FileNotFoundError, match=r"hf:.*nope"):
        load_documents(f"hf:{tmp_path / 'nope'}")


# --------------------------------------------------------------------------------------
# Token files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_round_trip_with_sidecar_dtype(tmp_path, dtype):
    high = np.iinfo(dtype).max
    tokens = np.array([0, 1, 256, high, 7, high - 1], dtype=dtype)
    path = save_token_file(tmp_path / "tokens.bin", tokens)
    assert json.loads((tmp_path / "tokens.bin.json").read_text()) == {"dtype": dtype}
    assert path.stat().st_size == tokens.nbytes
    loaded = load_token_file(path)
    assert isinstance(loaded, np.memmap)
    assert loaded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(loaded, tokens)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_npy_round_trip(tmp_path, dtype):
    tokens = np.arange(1000, dtype=dtype) * 3
    loaded = load_token_file(save_token_file(tmp_path / "tokens.npy", tokens))
    assert isinstance(loaded, np.memmap)
    assert loaded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(loaded, tokens)


def test_bin_without_sidecar_takes_the_explicit_dtype(tmp_path):
    path = tmp_path / "raw.bin"
    np.array([70000, 1, 2], dtype=np.uint32).tofile(path)
    np.testing.assert_array_equal(load_token_file(path, dtype="uint32"), [70000, 1, 2])
    np.testing.assert_array_equal(load_token_file(path, dtype=np.uint16), [4464, 1, 1, 0, 2, 0])


def test_bin_without_sidecar_or_dtype_is_an_error(tmp_path):
    path = tmp_path / "raw.bin"
    np.arange(4, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match=r"no dtype given and no sidecar .*raw\.bin\.json"):
        load_token_file(path)


def test_dtype_disagreeing_with_the_sidecar_is_an_error(tmp_path):
    path = save_token_file(tmp_path / "tokens.bin", np.arange(4, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"dtype uint32 given, .*tokens\.bin\.json says uint16"):
        load_token_file(path, dtype="uint32")


def test_bin_of_partial_tokens_is_an_error(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"3 bytes, not a whole number of uint16 tokens"):
        load_token_file(path, dtype="uint16")


def test_token_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no token file at .*absent\.bin"):
        load_token_file(tmp_path / "absent.bin")
    with pytest.raises(ValueError, match=r"dtype must be uint16 or uint32, got float32"):
        save_token_file(tmp_path / "t.bin", np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"non-empty 1-D array"):
        save_token_file(tmp_path / "t.bin", np.zeros((2, 2), dtype=np.uint16))
    with pytest.raises(ValueError, match=r"must end in \.bin or \.npy"):
        save_token_file(tmp_path / "t.txt", np.zeros(3, dtype=np.uint16))


# --------------------------------------------------------------------------------------
# The token stream
# --------------------------------------------------------------------------------------


def test_stream_puts_eos_after_every_document():
    tokens = build_token_stream(["ab", "é", "c"], ByteTokenizer())
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [97, 98, EOS, 0xC3, 0xA9, EOS, 99, EOS]


def test_stream_of_many_documents_splits_back_into_them():
    docs = [f"document number {i}: " + "x" * (i % 7) for i in range(600)]
    tok = ByteTokenizer()
    tokens = build_token_stream(iter(docs), tok)
    assert tokens[-1] == EOS
    pieces = np.split(tokens, np.flatnonzero(tokens == EOS) + 1)[:-1]
    assert [tok.decode(p[:-1]) for p in pieces] == docs


def test_stream_dtype_is_uint32_above_65536_ids():
    class WideTokenizer:
        vocab_size = 70_000
        eos_id = 69_999

        def encode_batch(self, texts):
            return [[65_536 + len(t)] for t in texts]

    tokens = build_token_stream(["a", "bcd"], WideTokenizer())
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [65_537, 69_999, 65_539, 69_999]


def test_stream_without_documents_is_an_error():
    with pytest.raises(ValueError, match=r"no documents"):
        build_token_stream([], ByteTokenizer())


LENGTHS = [7, 5, 9, 4, 6, 8, 30, 3, 11, 5, 12]


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5])
def test_heldout_is_the_last_boundary_keeping_the_fraction(fraction):
    tokens = stream_of(LENGTHS)
    n = len(tokens)
    train, heldout = split_heldout(tokens, fraction, EOS)
    cut = len(train)
    assert cut == max(s for s in doc_starts(tokens) if s <= n - math.ceil(fraction * n))
    assert train[-1] == EOS and heldout[-1] == EOS
    assert len(heldout) >= fraction * n
    np.testing.assert_array_equal(np.concatenate([train, heldout]), tokens)
    assert np.shares_memory(train, tokens) and np.shares_memory(heldout, tokens)


def test_heldout_grows_to_one_window_with_seq_len():
    tokens = stream_of(LENGTHS)
    train, heldout = split_heldout(tokens, 0.01, EOS)
    assert len(heldout) == LENGTHS[-1]
    train, heldout = split_heldout(tokens, 0.01, EOS, seq_len=15)
    assert len(heldout) == LENGTHS[-1] + LENGTHS[-2]
    assert len(heldout) >= 16 and train[-1] == EOS


def test_heldout_falls_back_to_the_first_boundary_after_the_fraction():
    tokens = stream_of([50, 3, 3])
    train, heldout = split_heldout(tokens, 0.5, EOS)
    assert (len(train), len(heldout)) == (50, 6)


def test_heldout_fraction_zero_holds_nothing_out():
    tokens = stream_of(LENGTHS)
    train, heldout = split_heldout(tokens, 0.0, EOS)
    assert len(train) == len(tokens) and len(heldout) == 0


def test_heldout_split_of_too_small_a_corpus_is_an_error():
    with pytest.raises(ValueError, match=r"a stream of 40 tokens has no document boundary"):
        split_heldout(stream_of([40]), 0.1, EOS)
    with pytest.raises(ValueError, match=r"at least 21 tokens on each side"):
        split_heldout(stream_of([10, 10, 10]), 0.3, EOS, seq_len=20)
    with pytest.raises(ValueError, match=r"fraction must lie in \[0, 1\)"):
        split_heldout(stream_of(LENGTHS), 1.0, EOS)


def test_heldout_split_of_a_memory_mapped_stream(tmp_path):
    tokens = stream_of([300] * 20)
    loaded = load_token_file(save_token_file(tmp_path / "t.npy", tokens))
    train, heldout = split_heldout(loaded, 0.1, EOS, seq_len=64)
    assert (len(train), len(heldout)) == (5400, 600)


# --------------------------------------------------------------------------------------
# PackedBatches
# --------------------------------------------------------------------------------------


def counting_batches(num_windows: int, seq_len: int, global_batch: int, **options):
    """Batches over tokens 0, 1, 2, ...: a token's value is its position in the stream."""
    tokens = np.arange(num_windows * (seq_len + 1) + 3, dtype=np.uint32)
    options.setdefault("seed", 0)
    return PackedBatches(tokens, seq_len, global_batch, eos_id=2**31, **options)


def test_windows_are_contiguous_slices_and_labels_shift_by_one():
    batches = counting_batches(num_windows=40, seq_len=16, global_batch=8)
    for step in range(6):
        batch = batches.batch(step)
        inputs, labels = batch["input_ids"], batch["labels"]
        assert inputs.shape == labels.shape == (8, 16)
        assert inputs.dtype == labels.dtype == torch.int64
        starts = inputs[:, :1]
        torch.testing.assert_close(inputs, starts + torch.arange(16))
        torch.testing.assert_close(labels, inputs + 1)
        assert (starts % 17 == 0).all()
        expected = torch.from_numpy(batches.window_indices(step) * 17)
        torch.testing.assert_close(starts[:, 0], expected)


def test_batch_is_a_pure_function_of_seed_and_step():
    first = counting_batches(num_windows=40, seq_len=8, global_batch=4, seed=3)
    second = counting_batches(num_windows=40, seq_len=8, global_batch=4, seed=3)
    expected = {step: first.batch(step)["input_ids"] for step in (0, 25, 7)}
    # Another object, the steps in another order, a skip across epochs: the same batches.
    for step in (7, 25, 0):
        torch.testing.assert_close(second.batch(step)["input_ids"], expected[step])
    assert not torch.equal(first.batch(0)["input_ids"], first.batch(1)["input_ids"])
    other_seed = counting_batches(num_windows=40, seq_len=8, global_batch=4, seed=4)
    assert not torch.equal(first.batch(0)["input_ids"], other_seed.batch(0)["input_ids"])


def test_every_epoch_visits_every_window_once_in_a_new_order():
    batches = counting_batches(num_windows=24, seq_len=4, global_batch=6, seed=1)
    assert (batches.num_windows, batches.steps_per_epoch) == (24, 4)
    epochs = [
        np.concatenate([batches.window_indices(e * 4 + s) for s in range(4)]) for e in range(3)
    ]
    for e, order in enumerate(epochs):
        assert sorted(order.tolist()) == list(range(24))
        np.testing.assert_array_equal(order, np.random.default_rng(1 + e).permutation(24))
    assert not np.array_equal(epochs[0], epochs[1])


def test_batches_straddle_epochs_without_dropping_windows():
    batches = counting_batches(num_windows=10, seq_len=4, global_batch=4, seed=0)
    assert batches.steps_per_epoch == 2
    seen = np.concatenate([batches.window_indices(s) for s in range(5)])
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shares_concatenate_to_the_global_batch(world_size):
    batches = counting_batches(num_windows=50, seq_len=8, global_batch=8)
    for step in (0, 3, 11):
        whole = batches.batch(step)
        shares = [batches.batch(step, rank=r, world_size=world_size) for r in range(world_size)]
        for key in ("input_ids", "labels"):
            assert all(s[key].shape == (8 // world_size, 8) for s in shares)
            torch.testing.assert_close(torch.cat([s[key] for s in shares]), whole[key])


def test_rank_errors():
    batches = counting_batches(num_windows=50, seq_len=8, global_batch=6)
    with pytest.raises(ValueError, match=r"global_batch = 6 does not divide into world_size = 4"):
        batches.batch(0, rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 2\), got 2"):
        batches.batch(0, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"step must be >= 0"):
        batches.batch(-1)


VARLEN_STREAM = [1, 2, EOS, 3, 4, 5, EOS, 6, 7, 8]


def test_varlen_by_hand():
    # Windows of 5 tokens: [1, 2, E, 3, 4] and [5, E, 6, 7, 8].
    batches = PackedBatches(
        np.array(VARLEN_STREAM, dtype=np.uint16), 4, 2, seed=0, eos_id=EOS, varlen=True
    )
    expected = {
        (0, 1): ([1, 2, EOS, 3, 5, EOS, 6, 7], [2, EOS, -100, 4, EOS, -100, 7, 8], [0, 3, 4, 6, 8]),
        (1, 0): ([5, EOS, 6, 7, 1, 2, EOS, 3], [EOS, -100, 7, 8, 2, EOS, -100, 4], [0, 2, 4, 7, 8]),
    }
    orders = {step: tuple(batches.window_indices(step).tolist()) for step in range(4)}
    assert set(orders.values()) == set(expected)
    for step, order in orders.items():
        batch = batches.batch(step)
        inputs, labels, cu_seqlens = expected[order]
        assert batch["input_ids"].tolist() == [inputs]
        assert batch["labels"].tolist() == [labels]
        assert batch["cu_seqlens"].tolist() == cu_seqlens
        assert batch["cu_seqlens"].dtype == torch.int32


@pytest.mark.parametrize("world_size", [1, 2])
def test_varlen_marks_every_document_start_and_masks_eos_labels(world_size):
    tokens = stream_of(np.random.default_rng(5).integers(1, 40, 200).tolist())
    seq_len, global_batch = 32, 8
    dense = PackedBatches(tokens, seq_len, global_batch, seed=2, eos_id=EOS)
    packed = PackedBatches(tokens, seq_len, global_batch, seed=2, eos_id=EOS, varlen=True)
    rows = global_batch // world_size
    for step in (0, 9):
        for rank in range(world_size):
            plain = dense.batch(step, rank=rank, world_size=world_size)
            batch = packed.batch(step, rank=rank, world_size=world_size)
            inputs = batch["input_ids"]
            total = rows * seq_len
            assert inputs.shape == batch["labels"].shape == (1, total)
            torch.testing.assert_close(inputs, plain["input_ids"].reshape(1, -1))
            is_eos = inputs[0] == EOS
            starts = {0, total} | set(range(0, total, seq_len))
            starts |= {i + 1 for i in torch.nonzero(is_eos[:-1]).flatten().tolist()}
            assert batch["cu_seqlens"].tolist() == sorted(starts)
            expected_labels = plain["labels"].reshape(1, -1).clone()
            expected_labels[0, is_eos] = -100
            torch.testing.assert_close(batch["labels"], expected_labels)
            assert is_eos.any()


def test_memory_mapped_stream_gives_the_same_batches(tmp_path):
    tokens = stream_of([13, 7, 29, 40, 3] * 20)
    loaded = load_token_file(save_token_file(tmp_path / "tokens.bin", tokens))
    in_memory = PackedBatches(tokens, 16, 4, seed=0, eos_id=EOS, varlen=True)
    mapped = PackedBatches(loaded, 16, 4, seed=0, eos_id=EOS, varlen=True)
    for step in (0, 5):
        for key, value in in_memory.batch(step).items():
            torch.testing.assert_close(mapped.batch(step)[key], value)


def test_state_dict_round_trip_and_mismatches():
    batches = counting_batches(num_windows=30, seq_len=8, global_batch=4, seed=7)
    state = batches.state_dict()
    assert state == {"seed": 7, "seq_len": 8, "global_batch": 4, "num_windows": 30}
    counting_batches(num_windows=30, seq_len=8, global_batch=4, seed=7).load_state_dict(state)
    mismatched = {
        "seed": counting_batches(num_windows=30, seq_len=8, global_batch=4, seed=8),
        "seq_len": counting_batches(num_windows=30, seq_len=9, global_batch=4, seed=7),
        "global_batch": counting_batches(num_windows=30, seq_len=8, global_batch=2, seed=7),
        "num_windows": counting_batches(num_windows=31, seq_len=8, global_batch=4, seed=7),
    }
    for key, other in mismatched.items():
        with pytest.raises(ValueError, match=rf"{key} = {state[key]} there, .*different data"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"expected keys"):
        batches.load_state_dict({"seed": 7})


def test_stream_too_short_for_a_window_or_a_batch_is_an_error():
    with pytest.raises(ValueError, match=r"stream of 8 tokens is shorter than one window of"):
        PackedBatches(np.zeros(8, dtype=np.uint16), 8, 1, seed=0, eos_id=EOS)
    with pytest.raises(ValueError, match=r"gives 2 windows .* fewer than global_batch = 4"):
        PackedBatches(np.zeros(20, dtype=np.uint16), 8, 4, seed=0, eos_id=EOS)
    with pytest.raises(ValueError, match=r"seq_len must be a positive integer"):
        PackedBatches(np.zeros(20, dtype=np.uint16), 0, 1, seed=0, eos_id=EOS)


# --------------------------------------------------------------------------------------
# eval_batches
# --------------------------------------------------------------------------------------


def test_eval_batches_are_the_windows_in_order():
    tokens = np.arange(7 * 9 + 4, dtype=np.uint16)
    batches = list(eval_batches(tokens, 8, 3))
    assert [b["input_ids"].shape for b in batches] == [(3, 8), (3, 8), (1, 8)]
    inputs = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    torch.testing.assert_close(inputs, torch.arange(7)[:, None] * 9 + torch.arange(8))
    torch.testing.assert_close(labels, inputs + 1)


def test_eval_batches_of_too_short_a_stream_is_an_error():
    with pytest.raises(ValueError, match=r"stream of 8 tokens is shorter than one window"):
        eval_batches(np.zeros(8, dtype=np.uint16), 8, 4)
