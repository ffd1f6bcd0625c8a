"""Tokenizers: bytes for the bases made here; a model folder's own tokenizer.json or vocab.json + merges.txt,
checked against the model's vocabulary; long texts encoded in pieces to the same ids."""

import json

import pytest
import torch
from conftest import GPT2_TEXT

import lora.tokenizer as tokenizer_module
from lora.errors import ConfigError
from lora.lora_transformer import LoRATransformer
from lora.tokenizer import END_OF_TEXT, ByteTokenizer, load_tokenizer, train_byte_bpe

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def trained():
    return train_byte_bpe([GPT2_TEXT], 300)


def test_bytes_round_trip_and_a_large_vocabulary_needs_its_own_tokenizer(tmp_path):
    text = "héllo, wörld"
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    assert load_tokenizer(None, 260).name == "byte"
    LoRATransformer(1000, d_model=16, num_heads=2, num_layers=1, lora_r=0).save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="vocabulary of 1000 is not byte-level"):
        load_tokenizer(tmp_path / "m", 1000)


def test_a_trained_tokenizer_is_padded_to_the_size_asked_with_end_of_text_last(trained):
    assert trained.get_vocab_size() == 300 and trained.token_to_id(END_OF_TEXT) == 299


def test_vocab_and_merges_read_as_the_tokenizer_json_does(trained, tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "pair").mkdir()
    trained.save(str(tmp_path / "json" / "tokenizer.json"))
    trained.model.save(str(tmp_path / "pair"))  # GPT-2's original files: vocab.json + merges.txt,
    vocab = json.dumps(trained.get_vocab(with_added_tokens=True))  # the vocabulary including <|endoftext|>
    (tmp_path / "pair" / "vocab.json").write_text(vocab)
    a, b = load_tokenizer(tmp_path / "json", 300), load_tokenizer(tmp_path / "pair", 300)
    assert b.source.name == "vocab.json"
    text = GPT2_TEXT[:500] + END_OF_TEXT + " the end"
    assert a.encode(text) == b.encode(text)
    assert b.encode(END_OF_TEXT) == [299]  # one special token, not 12 pieces of text
    assert b.decode(b.encode(GPT2_TEXT[:200])) == GPT2_TEXT[:200]


@pytest.mark.parametrize(
    ("model_vocab", "ok"), [(300, True), (320, True), (299, False), (280, False), (384, False)]
)
def test_the_vocabulary_must_be_the_model_s_or_its_padding(trained, tmp_path, model_vocab, ok):
    trained.save(str(tmp_path / "tokenizer.json"))
    if ok:
        assert load_tokenizer(tmp_path, model_vocab).vocab_size == 300
    else:
        with pytest.raises(ConfigError, match=f"the tokenizer has 300 tokens but the model {model_vocab}"):
            load_tokenizer(tmp_path, model_vocab)


def test_a_long_text_encodes_in_pieces_to_the_same_ids(trained, tmp_path, monkeypatch):
    trained.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, 300)
    text = ("  indented line\n\n\nThe next paragraph, with   spaces.\n" * 50) + "end"
    monkeypatch.setattr(tokenizer_module, "CHUNK_CHARS", 97)
    pieces = tokenizer_module._pieces(text, 97)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [i for ids in tok.encode_chunks(text) for i in ids] == tok.encode(text)
    assert torch.tensor(tok.encode(text)).numel() > 0
