"""Tokenizers: bytes for the bases made here; a model folder's own tokenizer.json or vocab.json + merges.txt,
checked against the model's vocabulary; long texts encoded in pieces to the same ids."""

import json
import re

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
    ("model_vocab", "ok"),
    [
        (300, True),
        (320, True),
        (310, True),
        (303, True),
        (299, False),
        (280, False),
        (384, False),
        (321, False),
    ],
)  # (rounded up to a multiple of 64, or a reserve of 1% as Qwen's 151,665 tokens for 151,936 embeddings)
def test_the_vocabulary_must_be_the_model_s_or_its_padding(trained, tmp_path, model_vocab, ok):
    trained.save(str(tmp_path / "tokenizer.json"))
    if ok:
        assert load_tokenizer(tmp_path, model_vocab).vocab_size == 300
    else:
        with pytest.raises(ConfigError, match=f"the tokenizer has 300 tokens but the model {model_vocab}"):
            load_tokenizer(tmp_path, model_vocab)


def test_the_embeddings_may_round_up_or_reserve_a_little_room_but_never_lack_an_id():
    fits = tokenizer_module.fits_embeddings
    assert fits(128_256, 128_256) and fits(50_257, 50_304)  # Llama 3; GPT-2 rounded up to a multiple of 64
    assert fits(151_665, 151_936) and fits(32_011, 32_064)  # Qwen2.5's reserve (0.18%), Phi-3's
    assert not fits(128_257, 128_256) and not fits(50_257, 151_936)  # an id beyond; GPT-2's beside Qwen's
    assert not fits(151_665, 153_600)  # (a reserve of 1.3%)


def test_a_long_text_encodes_in_pieces_to_the_same_ids(trained, tmp_path, monkeypatch):
    trained.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, 300)
    text = ("  indented line\n\n\nThe next paragraph, with   spaces.\n" * 50) + "end"
    monkeypatch.setattr(tokenizer_module, "CHUNK_CHARS", 97)
    pieces = tokenizer_module._pieces(text, 97)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [i for ids in tok.encode_chunks(text) for i in ids] == tok.encode(text)
    assert torch.tensor(tok.encode(text)).numel() > 0


# ---------------------------------------------------------------------------------------------------------
# Special tokens: BOS and EOS from the files beside tokenizer.json


def special_folder(folder, files=(), post_bos: bool = False):
    """A folder with a 300-token tokenizer whose last ids are ``<|endoftext|>`` 296, ``<s>`` 297, ``</s>`` 298
    and ``<|eot|>`` 299 (a post-processor putting ``<s>`` before each text with ``post_bos``, as Llama's
    ``tokenizer.json`` has), and the JSON files ``files`` (``{name: object}``, or a text) beside it."""
    from tokenizers import processors

    folder.mkdir(parents=True, exist_ok=True)
    tok = train_byte_bpe([GPT2_TEXT], 297)
    tok.add_special_tokens(["<s>", "</s>", "<|eot|>"])
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 297)]
        )
    tok.save(str(folder / "tokenizer.json"))
    for name, value in dict(files).items():
        (folder / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return folder


FAST = {"tokenizer_class": "PreTrainedTokenizerFast"}  # (what AutoTokenizer builds from tokenizer.json)
LLAMA2 = {**FAST, "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
LLAMA3 = {**FAST, "bos_token": "<s>", "eos_token": "</s>"}  # BOS from the post-processor alone

# case: (files, post-processor adds <s>, expected (bos, add_bos, eos, eos_ids), transformers agrees)
SPECIAL_CASES = {
    "llama-2": ({"tokenizer_config.json": LLAMA2, "generation_config.json": {"bos_token_id": 297, "eos_token_id": 298}},
                True, ("<s>", True, "</s>", (298,)), True),
    "llama-3": ({"tokenizer_config.json": LLAMA3, "generation_config.json": {"eos_token_id": [298, 299]}},
                True, ("<s>", True, "</s>", (298, 299)), True),
    "qwen": ({"tokenizer_config.json": {**FAST, "bos_token": None, "eos_token": "<|endoftext|>"},
              "generation_config.json": {}}, False, (None, False, "<|endoftext|>", (296,)), True),
    "special_tokens_map wins": ({"tokenizer_config.json": LLAMA3, "special_tokens_map.json": {"eos_token": {
        "content": "<|eot|>", "lstrip": False}}}, True, ("<s>", True, "<|eot|>", (299,)), True),
    "added_tokens_decoder: not it": ({"tokenizer_config.json": {**LLAMA3, "added_tokens_decoder": {}},
                                      "special_tokens_map.json": {"eos_token": "<|eot|>"}},
                                     True, ("<s>", True, "</s>", (298,)), True),
    "config.json": ({"config.json": {"model_type": "llama", "bos_token_id": 297, "eos_token_id": [298, 299]}},
                    False, ("<s>", False, "</s>", (298, 299)), True),
    # an explicit add_bos_token decides, as transformers 4's Llama and Gemma tokenizers honour it
    # (transformers 5 goes by the post-processor alone when there is a tokenizer.json)
    "add_bos_token true": ({"tokenizer_config.json": LLAMA2}, False, ("<s>", True, "</s>", (298,)), False),
    "add_bos_token false": ({"tokenizer_config.json": {**LLAMA2, "add_bos_token": False}}, True,
                            ("<s>", False, "</s>", (298,)), False),
}  # fmt: skip


@pytest.mark.parametrize("case", SPECIAL_CASES)
def test_special_tokens_are_read_as_transformers_reads_them(case, tmp_path):
    files, post_bos, expected, agrees = SPECIAL_CASES[case]
    folder = special_folder(tmp_path / "f", files, post_bos)
    tok = load_tokenizer(folder, 300)
    special = tok.special_tokens
    assert (special.bos, special.add_bos, special.eos, special.eos_ids) == expected
    text = "hello world"
    ids = tok.encode(text, add_bos=True)
    raw = tok.encode(text)
    assert ids == ([297] if special.add_bos else []) + raw and 297 not in raw  # BOS once
    if not agrees:
        return
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert theirs(text).input_ids == ids
    if (
        case != "config.json"
    ):  # (there, the strings come from the model's ids: transformers' tokenizer has none)
        assert (theirs.bos_token, theirs.eos_token, theirs.eos_token_id) == (
            special.bos,
            special.eos,
            special.eos_id,
        )
    if "generation_config.json" in files:
        eos = transformers.GenerationConfig.from_pretrained(folder).eos_token_id
        if eos is None:  # the model names none (Qwen's here): generation stops at the tokenizer's EOS
            assert special.eos_ids == (special.eos_id,)
        else:
            assert tuple(eos if isinstance(eos, list) else [eos]) == special.eos_ids


def test_the_model_s_ids_are_kept_as_a_generation_config_and_read_back_alone(tmp_path):
    config = {"model_type": "llama", "bos_token_id": 297, "eos_token_id": [298, 299]}
    tok = load_tokenizer(special_folder(tmp_path / "base", {"config.json": config}), 300)
    files = tok.run_files()
    assert sorted(files) == ["generation_config.json", "tokenizer.json"]
    assert json.loads(files["generation_config.json"]) == {"bos_token_id": 297, "eos_token_id": [298, 299]}
    (tmp_path / "run").mkdir()
    for name, data in files.items():
        (tmp_path / "run" / name).write_bytes(data)
    assert load_tokenizer(tmp_path / "run", 300).special_tokens.eos_ids == (298, 299)
    files = {"tokenizer_config.json": LLAMA3, "special_tokens_map.json": {"eos_token": "</s>"},
             "generation_config.json": {"eos_token_id": 299}}  # fmt: skip
    folder = special_folder(tmp_path / "llama", files, post_bos=True)
    kept = load_tokenizer(folder, 300).run_files()
    assert {name: kept[name] for name in files} == {name: (folder / name).read_bytes() for name in files}


def test_each_document_starts_with_bos_exactly_once(tmp_path):
    from lora.data import _encode_rows, token_ids

    tok = load_tokenizer(special_folder(tmp_path / "f", {"tokenizer_config.json": LLAMA2}, True), 300)
    enc = tok.encode
    text = "one two</s>three</s><s>four</s>"
    ids = token_ids(text.encode(), tok).tolist()
    # each document starts with <s> 297 (the third has its own), the EOS </s> 298 between; none after the last
    assert ids == [297, *enc("one two"), 298, 297, *enc("three"), 298, 297, *enc("four"), 298]
    assert token_ids(b"", tok).numel() == 0
    rows = _encode_rows([("the fox", 0), ("", 1)], [0, 1], 4, tok)
    assert rows.x.tolist() == [[297, *enc("the fox")[:3]], [297, *enc(" "), 0, 0][:4]]
    assert rows.lengths.tolist() == [4, 1 + len(enc(" "))]
    plain = load_tokenizer(special_folder(tmp_path / "g", {"tokenizer_config.json": LLAMA3}), 300)
    assert token_ids(text.encode(), plain).tolist() == plain.encode(text)  # no BOS added: the text as it is


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tokenizer_config.json": {"bos_token": "<zzz>"}},
         "tokenizer_config.json: bos_token '<zzz>' is not in the tokenizer's vocabulary"),
        ({"special_tokens_map.json": {"eos_token": {"content": "<nope>"}}},
         "special_tokens_map.json: eos_token '<nope>' is not in the tokenizer's vocabulary"),
        ({"tokenizer_config.json": {"eos_token": 5}}, "tokenizer_config.json: eos_token must be a string"),
        ({"generation_config.json": {"eos_token_id": [298, 300]}},
         "generation_config.json: eos_token_id 300 is beyond the model's 300 embeddings"),
        ({"generation_config.json": {"eos_token_id": [2, -1]}},
         "generation_config.json: eos_token_id must be a token id (an integer >= 0) or a list of them, got [2, -1]"),
        ({"config.json": {"model_type": "llama", "bos_token_id": 512}},
         "config.json: bos_token_id 512 is beyond the model's 300 embeddings"),
        ({"tokenizer_config.json": {"add_bos_token": "yes"}},
         "tokenizer_config.json: add_bos_token must be true or false, got 'yes'"),
        ({"tokenizer_config.json": {"add_bos_token": True}},
         "tokenizer_config.json: add_bos_token is true but no bos_token is named"),
        ({"generation_config.json": "{"}, "generation_config.json: not readable JSON"),
    ],
)  # fmt: skip
def test_a_special_token_the_model_does_not_have_is_refused_naming_the_file(files, message, tmp_path):
    folder = special_folder(tmp_path / "f", files)
    with pytest.raises(ConfigError, match=re.escape(str(folder / message))) as e:
        load_tokenizer(folder, 300)
    assert "\n" not in str(e.value)
