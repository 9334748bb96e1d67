"""Tokenizers: byte ids and specials, BPE training and round trips, tokenizer.json save/load,
build_tokenizer specs and the errors of each."""

from __future__ import annotations

import json
import sys

import pytest

from memzoo.train.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog. " * 4,
    "a tokenizer learns the merges that its training corpus repeats most often.",
    "déjà vu: naïve café, über straße, 日本語のテキスト, emoji 😀🚀",
    "def train(model, data):\n    for batch in data:\n        loss = model(batch)\n",
]

ROUND_TRIP = [
    pytest.param("", id="empty"),
    pytest.param("hello, world", id="ascii"),
    pytest.param("déjà vu — 日本語 😀", id="multibyte"),
    pytest.param("tabs\tand\nnewlines\r\n  \x00nul", id="control"),
    pytest.param("never seen: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", id="unseen-chars"),
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=300)


# --------------------------------------------------------------------------------------
# ByteTokenizer
# --------------------------------------------------------------------------------------


def test_byte_specials_and_vocab():
    tok = ByteTokenizer()
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.unk_id) == (256, 257, 258, 259)
    assert tok.vocab_size == 260
    assert tok.name == "byte"


def test_byte_encode_is_utf8_bytes():
    assert ByteTokenizer().encode("aé😀") == [97, 0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_byte_decode_drops_specials():
    assert ByteTokenizer().decode([104, 256, 105, 257, 258, 259, 33]) == "hi!"


def test_byte_decode_replaces_invalid_utf8():
    # 0xC3 opens a two-byte sequence that 0x28 ("(") does not continue.
    assert ByteTokenizer().decode([0xFF, 97, 0xC3, 0x28]) == "\ufffda\ufffd("


def test_byte_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"\[0, 260\).*\[260, -1\]"):
        ByteTokenizer().decode([97, 260, -1])


def test_byte_encode_batch_equals_encode():
    tok = ByteTokenizer()
    assert tok.encode_batch(["ab", "", "é"]) == [[97, 98], [], [0xC3, 0xA9]]


# --------------------------------------------------------------------------------------
# BPETokenizer
# --------------------------------------------------------------------------------------


def test_bpe_specials_come_first(bpe):
    assert bpe.name == "bpe"
    assert (bpe.eos_id, bpe.pad_id) == (0, 1)
    assert bpe.tokenizer.id_to_token(0) == "<|endoftext|>"


def test_bpe_learns_merges_within_vocab_size(bpe):
    # 2 specials + 256 byte symbols, then merges up to the requested size.
    assert 258 < bpe.vocab_size <= 300
    text = "the quick brown fox"
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_bpe_round_trip(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_text_never_produces_special_ids(bpe):
    text = "before <|endoftext|> after <|pad|>"
    ids = bpe.encode(text)
    assert bpe.eos_id not in ids and bpe.pad_id not in ids
    assert bpe.decode(ids) == text


def test_bpe_decode_drops_specials(bpe):
    ids = bpe.encode("ab") + [bpe.eos_id] + bpe.encode("cd") + [bpe.pad_id]
    assert bpe.decode(ids) == "abcd"


def test_bpe_encode_batch_equals_encode(bpe):
    texts = CORPUS + [""]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_bpe_train_is_deterministic(bpe):
    again = BPETokenizer.train(CORPUS, vocab_size=300)
    assert again.to_json() == bpe.to_json()


def test_bpe_vocab_size_below_alphabet_is_an_error():
    with pytest.raises(ValueError, match=r"vocab_size must be >= 258"):
        BPETokenizer.train(CORPUS, vocab_size=257)


def test_bpe_without_tokenizers_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"pip install tokenizers"):
        BPETokenizer.train(CORPUS, vocab_size=300)


def test_bpe_tokenizer_without_eos_token_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    path.write_text(Tokenizer(models.BPE()).to_str())
    with pytest.raises(ValueError, match=r"tokenizer.json.*<\|endoftext\|>"):
        load_tokenizer(path)


# --------------------------------------------------------------------------------------
# save_tokenizer / load_tokenizer
# --------------------------------------------------------------------------------------


def test_save_byte_tokenizer_writes_its_type(tmp_path):
    path = save_tokenizer(ByteTokenizer(), tmp_path / "run")
    assert path == tmp_path / "run" / "tokenizer.json"
    assert json.loads(path.read_text()) == {"type": "byte"}
    assert isinstance(load_tokenizer(tmp_path / "run"), ByteTokenizer)


def test_save_load_bpe_gives_equal_encodings(bpe, tmp_path):
    save_tokenizer(bpe, tmp_path)
    for loaded in (load_tokenizer(tmp_path), load_tokenizer(tmp_path / "tokenizer.json")):
        assert isinstance(loaded, BPETokenizer)
        assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (bpe.vocab_size, 0, 1)
        for text in CORPUS + ["before <|endoftext|> after"]:
            assert loaded.encode(text) == bpe.encode(text)


def test_bpe_from_file(bpe, tmp_path):
    path = save_tokenizer(bpe, tmp_path)
    assert BPETokenizer.from_file(path).encode(CORPUS[2]) == bpe.encode(CORPUS[2])


def test_bpe_from_file_of_a_byte_tokenizer_is_an_error(tmp_path):
    path = save_tokenizer(ByteTokenizer(), tmp_path)
    with pytest.raises(ValueError, match=r"byte tokenizer, not a BPE one"):
        BPETokenizer.from_file(path)


def test_save_leaves_no_temporary_files(bpe, tmp_path):
    save_tokenizer(bpe, tmp_path)
    save_tokenizer(ByteTokenizer(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_load_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer file at .*nowhere$"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer file at .*run/tokenizer\.json$"):
        load_tokenizer(tmp_path / "run")


def test_load_corrupt_json_names_the_path(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"type": "by')
    with pytest.raises(ValueError, match=r"tokenizer\.json is not valid JSON"):
        load_tokenizer(tmp_path)


def test_load_json_that_is_no_tokenizer_names_the_path(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"type": "word"}')
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a tokenizer file"):
        load_tokenizer(path)


def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match=r"ByteTokenizer or BPETokenizer"):
        save_tokenizer(object(), tmp_path)


# --------------------------------------------------------------------------------------
# build_tokenizer
# --------------------------------------------------------------------------------------


def test_build_byte():
    assert isinstance(build_tokenizer("byte", None, None), ByteTokenizer)
    assert build_tokenizer("byte", None, 260).vocab_size == 260


def test_build_bpe_trains_on_the_given_texts(bpe):
    tok = build_tokenizer("bpe", lambda: iter(CORPUS), 300)
    assert tok.to_json() == bpe.to_json()


def test_build_from_a_path(bpe, tmp_path):
    path = save_tokenizer(bpe, tmp_path)
    for spec in (str(path), str(tmp_path)):
        assert build_tokenizer(spec, None, None).encode(CORPUS[0]) == bpe.encode(CORPUS[0])


def test_build_bpe_needs_vocab_size_and_texts():
    with pytest.raises(ValueError, match=r"needs a vocab_size"):
        build_tokenizer("bpe", lambda: CORPUS, None)
    with pytest.raises(ValueError, match=r"needs its texts"):
        build_tokenizer("bpe", None, 300)


def test_build_with_another_vocab_size_is_an_error():
    with pytest.raises(ValueError, match=r"260 ids but vocab_size=512"):
        build_tokenizer("byte", None, 512)


def test_build_unknown_spec_lists_the_choices(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match=r"'byte', 'bpe' or the path.*missing\.json"):
        build_tokenizer(str(missing), None, None)
