"""Chat files: every format read to the same conversations, JSONL and JSON lists, and every bad row refused in
one line naming the file and the line."""

import json

import pytest

from lora.chat_data import Message, read_chat_file
from lora.errors import DataError

QA = [Message("user", "What is 2+2?"), Message("assistant", "4")]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "row",
    [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
        {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
        {"conversations": [{"from": "user", "value": "What is 2+2?"}, {"from": "assistant", "value": "4"}]},
        {"prompt": "What is 2+2?", "completion": "4", "id": 7},
        {"instruction": "What is 2+2?", "output": "4"},
        {"instruction": "What is 2+2?", "input": "", "output": "4"},
        {"instruction": "What is 2+2?", "input": None, "output": "4"},
    ],
)
def test_every_format_reads_to_the_same_conversation(tmp_path, row):
    data = read_chat_file(write_jsonl(tmp_path / "d.jsonl", [row, row]))
    assert data.conversations == [QA, QA] and data.lines == [1, 2] and len(data) == 2


def test_formats_are_named_and_alpaca_input_follows_a_blank_line(tmp_path):
    rows = [{"instruction": "Reverse the word.", "input": "abc", "output": "cba"}]
    data = read_chat_file(write_jsonl(tmp_path / "a.jsonl", rows))
    assert data.format == "alpaca"
    assert data.conversations == [[Message("user", "Reverse the word.\n\nabc"), Message("assistant", "cba")]]
    system = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                                {"from": "gpt", "value": "Bye!"}]}  # fmt: skip
    data = read_chat_file(write_jsonl(tmp_path / "s.jsonl", [system]))
    assert data.format == "sharegpt" and [m.role for m in data.conversations[0]] == [
        "system", "user", "assistant", "user", "assistant"]  # fmt: skip
    assert (
        read_chat_file(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}])).format
        == "prompt"
    )


def test_a_json_list_is_read_with_the_line_of_each_element(tmp_path):
    row = {"prompt": "What is 2+2?", "completion": "4"}
    path = tmp_path / "d.json"
    path.write_text("[\n  " + json.dumps(row) + ",\n\n  " + json.dumps(row) + "\n]\n")
    data = read_chat_file(path)
    assert data.conversations == [QA, QA] and data.lines == [2, 4]
    path.write_text("[\n" + json.dumps(row) + ",\n" + json.dumps({"prompt": "x", "completion": " "}) + "\n]")
    with pytest.raises(DataError, match=r"d.json line 3: turn 1 is an empty answer"):
        read_chat_file(path)


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    good = {"prompt": "a", "completion": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", "  ", good, {"prompt": "a", "completion": 5}])
    with pytest.raises(DataError) as e:
        read_chat_file(path)
    assert str(e.value) == f'{path} line 5: "completion" must be a string, got int 5'


U, A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
S = {"role": "system", "content": "s"}
REFUSED = [
    ("not json {", r"line 2: invalid JSON \(Expecting value\)"),
    ({"text": "x", "label": 1}, r"line 2: not a chat row \(got keys \['label', 'text'\]\); expected an object with messages"),
    ([1, 2], r"line 2: not a chat row \(got list\)"),
    ({"prompt": "q", "completion": "a"}, r"line 2: a prompt row, but the file is in the messages format \(line 1\)"),
    ({"messages": [U, {"role": "assistant", "content": "  \n"}]}, r"line 2: turn 1 is an empty answer"),
    ({"messages": [U, {"role": "bot", "content": "a"}]}, r"line 2: turn 1 has unknown role 'bot'; expected one of system, user, assistant"),
    ({"messages": [U, U, A]}, r"line 2: turn 1 is user where assistant was expected"),
    ({"messages": [A]}, r"line 2: turn 0 is assistant where user was expected"),
    ({"messages": [U, A, S, U, A]}, r"line 2: turn 2 is system where user was expected"),
    ({"messages": [S, U, A, U]}, r"line 2: the conversation ends with a user turn"),
    ({"messages": [S]}, r"line 2: no user or assistant turn"),
    ({"messages": []}, r"line 2: no user or assistant turn"),
    ({"messages": [U, {"role": "assistant", "content": ["a"]}]}, r"""line 2: turn 1's "content" must be a string, got list \['a'\]"""),
    ({"messages": [U, {"role": "assistant"}]}, r'line 2: turn 1 of "messages" must be an object with "role" and "content"'),
    ({"messages": "q a"}, r'line 2: "messages" must be a list of turns, got str'),
]  # fmt: skip


@pytest.mark.parametrize(("row", "message"), REFUSED)
def test_every_bad_row_is_refused_in_one_line_naming_its_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [S, U, A]}, row])
    with pytest.raises(DataError, match=message) as e:
        read_chat_file(path)
    assert str(e.value).startswith(f"{path} line 2: ") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}],
         r"line 1: turn 1 has unknown from 'robot'; expected one of system, human, user, gpt, assistant"),
        ([{"instruction": "q", "input": 3, "output": "a"}], r'line 1: "input" must be a string, got int 3'),
        ([{"instruction": "q", "output": ""}], r"line 1: turn 1 is an empty answer"),
        ([{"prompt": ["q"], "completion": "a"}], r'line 1: "prompt" must be a string, got list'),
    ],
)  # fmt: skip
def test_other_formats_refuse_their_bad_rows(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        read_chat_file(write_jsonl(tmp_path / "d.jsonl", rows))


def test_unreadable_files_are_refused_in_one_line(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_chat_file(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="data file is empty"):
        read_chat_file(write_jsonl(tmp_path / "e.jsonl", ["", " "]))
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt": "q", "completion": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"b.jsonl line 2: not UTF-8 \(byte 0xff"):
        read_chat_file(tmp_path / "b.jsonl")
    (tmp_path / "l.json").write_text("[]")
    with pytest.raises(DataError, match=r"l.json: no conversations"):
        read_chat_file(tmp_path / "l.json")
    (tmp_path / "m.json").write_text(
        '[\n{"prompt": "q", "completion": "a"}\n{"prompt": "q", "completion": "a"}]'
    )
    with pytest.raises(
        DataError, match=r"m.json line 3: invalid JSON \(expected ',' or '\]' after an element\)"
    ):
        read_chat_file(tmp_path / "m.json")
    (tmp_path / "n.json").write_text(
        '[\n{"prompt": "q", "completion": "a"},\n{"prompt": "q" "completion": "a"}]'
    )
    with pytest.raises(DataError, match=r"n.json line 3: invalid JSON \(Expecting ',' delimiter\)"):
        read_chat_file(tmp_path / "n.json")
    (tmp_path / "x.json").write_text('[{"prompt": "q", "completion": "a"}]\n{}')
    with pytest.raises(DataError, match=r"x.json line 2: invalid JSON \(extra data after the list\)"):
        read_chat_file(tmp_path / "x.json")
