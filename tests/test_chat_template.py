"""Chat templates: rendered and tokenized as transformers' ``apply_chat_template`` does, token for token, on a
tiny Llama-family folder with a ChatML (Qwen) and a Llama-3 template; the loss mask is the answers and their
end-of-turn token, counted by hand; the built-in template on bytes; templates that fail, refused in one line."""

import json
import sys

import pytest
import tokenizers
from conftest import make_llama_folder

import lora.chat_template as chat_template
from lora.chat_data import Message
from lora.chat_template import (
    BUILT_IN,
    DEFAULT_TEMPLATE,
    ChatTemplate,
    answer_spans,
    encode_chat,
    load_chat_template,
)
from lora.errors import ConfigError
from lora.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

# written here in the style of Qwen2's and Llama 3's tokenizer_config.json (nothing is downloaded)
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if loop.first and message['role'] == 'system' %}{% continue %}{% endif %}\n"
    "    {%- if message['role'] == 'assistant' %}\n"
    "        {{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{- '\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
LLAMA3 = (
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}\n"
    "    {%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' %}\n"
    "    {%- if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\n"
    "    {{- content }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}\n"
)
STYLES = {
    "chatml": ("qwen2", CHATML, ["<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": ("llama", LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
}  # fmt: skip
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}

TWO_TURNS = [Message("user", "Who jumps?"), Message("assistant", "The quick brown fox."),
             Message("user", "Over what?"), Message("assistant", "The lazy dog.")]  # fmt: skip
CONVERSATIONS = [
    TWO_TURNS,
    [Message("system", "Answer in one word."), *TWO_TURNS],
    [Message("user", "Say héllo ✓"), Message("assistant", "  héllo ✓ \n"), Message("user", "def greet(name):"),
     Message("assistant", "    return 'hello ' + name")],
]  # fmt: skip


def make_chat_folder(folder, style):
    """A tiny Llama-family folder whose tokenizer has the style's special tokens and whose
    ``tokenizer_config.json`` carries its chat template."""
    kind, template, specials, tokens = STYLES[style]
    make_llama_folder(folder, kind, vocab_size=300 + len(specials))
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=list(STYLES))
def chat_folder(request, tmp_path_factory):
    import transformers

    folder = make_chat_folder(tmp_path_factory.mktemp(request.param) / "base", request.param)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = HFTokenizer(
        tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")), folder / "tokenizer.json"
    )
    return request.param, folder, hf, ours


def hf_ids(hf, conversation, **kw):
    """transformers' ids (its apply_chat_template returns a BatchEncoding in version 5, a list before)."""
    out = hf.apply_chat_template([m.as_dict() for m in conversation], tokenize=True, **kw)
    return list(out if isinstance(out, list) else out["input_ids"])


def test_rendering_equals_transformers_token_for_token(chat_folder):
    style, folder, hf, ours = chat_folder
    template = load_chat_template(folder)
    assert template.source == str(folder / "tokenizer_config.json")
    for conversation in CONVERSATIONS:
        tokens = encode_chat(conversation, template, ours)
        assert tokens.text == hf.apply_chat_template([m.as_dict() for m in conversation], tokenize=False)
        assert tokens.ids == hf_ids(hf, conversation)
        prompt = template.render(conversation[:-1], add_generation_prompt=True)
        assert ours.encode(prompt) == hf_ids(hf, conversation[:-1], add_generation_prompt=True)
    assert template.end_of_turn == END[style]


def test_the_mask_is_the_answers_and_their_end_of_turn_counted_by_hand(chat_folder):
    """The two-turn conversation spelled out piece by piece: scaffolding and questions unscored, each answer and
    the end-of-turn token after it scored; the newline after ChatML's <|im_end|> is not."""
    style, folder, _, ours = chat_folder
    tokens = encode_chat(TWO_TURNS, load_chat_template(folder), ours)
    enc, special = ours.encode, ours.tokenizer.token_to_id
    q1, a1, q2, a2 = (enc(m.content) for m in TWO_TURNS)
    if style == "chatml":
        start, end, nl = special("<|im_start|>"), special("<|im_end|>"), enc("\n")
        pieces = [([start, *enc("system\nYou are a helpful assistant."), end, *nl], False),
                  ([start, *enc("user\n"), *q1, end, *nl, start, *enc("assistant\n")], False), ([*a1, end], True),
                  ([*nl, start, *enc("user\n"), *q2, end, *nl, start, *enc("assistant\n")], False), ([*a2, end], True),
                  (nl, False)]  # fmt: skip
    else:
        head, tail, end = special("<|start_header_id|>"), special("<|end_header_id|>"), special("<|eot_id|>")
        pieces = [([special("<|begin_of_text|>"), head, *enc("user"), tail, *enc("\n\n"), *q1, end, head,
                    *enc("assistant"), tail, *enc("\n\n")], False), ([*a1, end], True),
                  ([head, *enc("user"), tail, *enc("\n\n"), *q2, end, head, *enc("assistant"), tail, *enc("\n\n")],
                   False), ([*a2, end], True)]  # fmt: skip
    assert tokens.ids == [i for ids, _ in pieces for i in ids]
    assert tokens.scored == [s for ids, s in pieces for _ in ids]
    # by hand: the answers are 11 and 8 tokens of this small tokenizer, each + 1 end of turn
    assert [ours.decode([i]) for i in a1] == ["The", " ", "qu", "ick", " ", "bro", "w", "n", " f", "ox", "."]
    assert [ours.decode([i]) for i in a2] == ["The", " l", "az", "y", " ", "do", "g", "."]
    assert sum(tokens.scored) == 11 + 1 + 8 + 1
    scored_text = ours.decode([i for i, s in zip(tokens.ids, tokens.scored, strict=True) if s])
    assert scored_text == f"The quick brown fox.{END[style]}The lazy dog.{END[style]}"


@pytest.mark.parametrize("chat_folder", ["chatml"], indirect=True)
def test_the_mask_equals_transformers_generation_mask(chat_folder):
    """ChatML's answers sit in a ``{% generation %}`` block: transformers' own assistant mask is ours."""
    _, folder, hf, ours = chat_folder
    for conversation in CONVERSATIONS:
        out = hf.apply_chat_template([m.as_dict() for m in conversation], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)  # fmt: skip
        tokens = encode_chat(conversation, load_chat_template(folder), ours)
        assert tokens.ids == list(out["input_ids"])
        assert tokens.scored == [bool(m) for m in out["assistant_masks"]]


def test_the_built_in_template_renders_and_masks_on_bytes():
    template = load_chat_template(None)
    assert (template.source, template.text, template.end_of_turn) == (BUILT_IN, DEFAULT_TEMPLATE, "<|end|>")
    conversation = [Message("system", "Be brief."), Message("user", "2+2?"), Message("assistant", "4"),
                    Message("user", "Spell it."), Message("assistant", "four")]  # fmt: skip
    tokens = encode_chat(conversation, template, ByteTokenizer())
    text = ("<|system|>\nBe brief.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n"
            "<|user|>\nSpell it.<|end|>\n<|assistant|>\nfour<|end|>\n")  # fmt: skip
    assert tokens.text == text and tokens.ids == list(text.encode())
    shown = "".join(ch if s else "_" for ch, s in zip(text, tokens.scored, strict=True))
    assert shown == "_" * 63 + "4<|end|>" + "_" * 41 + "four<|end|>_"
    assert template.render(conversation[:2], add_generation_prompt=True) == text[:63]
    # a character of several bytes: every byte of an answer's character is scored
    tokens = encode_chat([Message("user", "é?"), Message("assistant", "é")], template, ByteTokenizer())
    assert [b for b, s in zip(tokens.ids, tokens.scored, strict=True) if s] == list("é<|end|>".encode())


def test_train_on_prompt_and_truncation():
    template, byte = load_chat_template(None), ByteTokenizer()
    conversation = [Message("user", "2+2?"), Message("assistant", "four")]  # the answer starts at byte 35
    assert all(encode_chat(conversation, template, byte, train_on_prompt=True).scored)
    assert encode_chat(conversation, template, byte, max_tokens=35) is None  # cut before the answer: dropped
    kept = encode_chat(conversation, template, byte, max_tokens=36)
    assert kept.ids == list(b"<|user|>\n2+2?<|end|>\n<|assistant|>\nf")
    assert kept.scored == [False] * 35 + [True]
    assert encode_chat(conversation, template, byte, train_on_prompt=True, max_tokens=1) is None
    assert len(encode_chat(conversation, template, byte, train_on_prompt=True, max_tokens=2)) == 2


def test_a_plain_encode_function_is_cut_at_the_edges_or_refused(chat_folder):
    """Bytes never merge: a plain text -> ids function gives the offsets' answer. A BPE merges the prompt's
    last space into the answer's first word (" l"): through offsets that token is the answer's first and
    scored; piece by piece the ids would differ from the whole text's, so a plain function is refused."""
    _, _, _, ours = chat_folder
    template = ChatTemplate("{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
                            "{% if add_generation_prompt %}Assistant: {% endif %}", "test")  # fmt: skip
    conversation = [Message("user", "Who?"), Message("assistant", "lazy fox")]
    by_offsets = encode_chat(conversation, template, ByteTokenizer())
    plain = encode_chat(conversation, template, ByteTokenizer().encode)
    assert (plain.ids, plain.scored) == (by_offsets.ids, by_offsets.scored)
    tokens = encode_chat(conversation, template, ours)
    assert ours.decode([i for i, s in zip(tokens.ids, tokens.scored, strict=True) if s]) == " lazy fox"
    with pytest.raises(ConfigError, match="chat template test: the tokenizer merges tokens across the edge"):
        encode_chat(conversation, template, ours.encode)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{% for m in messages %}{{ m.content }}", r"chat template bad line 1: Unexpected end of template"),
        ("{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
         r"chat template bad failed to render: TemplateError: Conversation roles must alternate user/assistant"),
        ("{{ ''.__class__.__mro__ }}", r"chat template bad failed to render: SecurityError: access to attribute"),
        ("{{ messages[0].content + 1 }}", r"chat template bad failed to render: TypeError: can only concatenate"),
        ("{% if messages | length > 2 %}x{% else %}{% for m in messages %}{{ m.content }}{% endfor %}{% endif %}",
         r"chat template bad: turn 1 renders differently once the conversation goes on"),
        ("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}",
         r"chat template bad: renders nothing for the answer of turn 1"),
    ],
)  # fmt: skip
def test_a_failing_template_is_refused_in_one_line(text, message):
    template = ChatTemplate(text, "bad")
    with pytest.raises(ConfigError, match=message) as e:
        encode_chat([*TWO_TURNS, Message("user", "x"), Message("assistant", "y")], template, ByteTokenizer())
    assert "\n" not in str(e.value)


def test_filters_and_globals_are_transformers_own():
    template = ChatTemplate("{{ messages | tojson }}|{{ bos_token }}|{{ strftime_now('%Y') | length }}|"
                            "{% for m in messages %}{% if loop.first %}{% break %}{% endif %}x{% endfor %}",
                            "test", {"bos_token": "<s>"})  # fmt: skip
    conversation = [Message("user", '<héllo> & "you"'), Message("assistant", "ok")]
    expected = json.dumps([m.as_dict() for m in conversation], ensure_ascii=False)  # not HTML-escaped
    assert template.render(conversation) == f"{expected}|<s>|4|"


def test_where_a_template_comes_from(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    assert load_chat_template(folder).source == BUILT_IN
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ eos_token }}D"}]
    config = {"chat_template": templates, "eos_token": {"content": "</s>"}, "bos_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    template = load_chat_template(folder)
    assert (template.text, dict(template.special_tokens)) == ("{{ eos_token }}D", {"eos_token": "</s>"})
    assert template.render(TWO_TURNS) == "</s>D"
    # a chat_template.jinja beside the config wins, as in transformers
    (folder / "chat_template.jinja").write_text("J{{ eos_token }}")
    template = load_chat_template(folder)
    assert (template.source, template.render(TWO_TURNS)) == (str(folder / "chat_template.jinja"), "J</s>")
    (tmp_path / "mine.jinja").write_text("M")  # given: it wins over both
    assert load_chat_template(folder, tmp_path / "mine.jinja").render(TWO_TURNS) == "M"
    assert load_chat_template(None, tmp_path / "mine.jinja").source == str(tmp_path / "mine.jinja")
    with pytest.raises(ConfigError, match=r"chat template not found: .*nope\.jinja"):
        load_chat_template(folder, tmp_path / "nope.jinja")
    (folder / "chat_template.jinja").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates[:1]}))
    with pytest.raises(ConfigError, match=r"lists templates \['tool_use'\] but no \"default\""):
        load_chat_template(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ConfigError, match=r'"chat_template" must be a string or a list .*got int'):
        load_chat_template(folder)
    (folder / "tokenizer_config.json").write_text("{")
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json: not valid JSON"):
        load_chat_template(folder)


def test_without_jinja2_one_line_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    chat_template._compile.cache_clear()
    try:
        with pytest.raises(
            ConfigError, match=r'chat templates need the jinja2 package: pip install -e "\.\[hf\]"'
        ):
            ChatTemplate("{{ 1 }}", "test").render([])
    finally:
        chat_template._compile.cache_clear()


def test_an_old_jinja2_is_refused(monkeypatch):
    import jinja2

    monkeypatch.setattr(jinja2, "__version__", "3.1.5")
    chat_template._compile.cache_clear()
    try:
        with pytest.raises(
            ConfigError, match=r"need jinja2 >= 3\.1\.6 \(older versions have sandbox escapes\)"
        ):
            ChatTemplate("{{ 1 }}", "test").render([])
    finally:
        chat_template._compile.cache_clear()


def test_answer_spans_are_the_answers_and_end_of_turn_in_characters():
    text, spans = answer_spans(TWO_TURNS, load_chat_template(None))
    assert [text[a:b] for a, b in spans] == ["The quick brown fox.<|end|>", "The lazy dog.<|end|>"]


def test_a_gpt2_folder_without_a_template_gets_the_built_in_one(gpt2_folder):
    """GPT-2 has no chat template: the built-in one, its markers ordinary BPE tokens, masked through offsets."""
    template = load_chat_template(gpt2_folder)
    tokenizer = load_tokenizer(gpt2_folder, 300)
    assert template.source == BUILT_IN and isinstance(tokenizer, HFTokenizer)
    tokens = encode_chat(TWO_TURNS, template, tokenizer)
    assert tokens.ids == tokenizer.encode(tokens.text)
    scored = tokenizer.decode([i for i, s in zip(tokens.ids, tokens.scored, strict=True) if s])
    assert scored == "The quick brown fox.<|end|>The lazy dog.<|end|>"
