"""scripts/chat.py: in-process (exact replies, history, commands, bad input) and through a pseudo-terminal
(streamed turns, /reset, /adapter, Ctrl-C during a reply and at the prompt)."""

import codecs
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_llama_folder

from lora.chat_data import Message
from lora.chat_template import load_chat_template
from lora.lora_transformer import LoRATransformer
from lora.tokenizer import ByteTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
N = 12  # --max_new_tokens of the exact turns


def script():
    spec = importlib.util.spec_from_file_location("chat", ROOT / "scripts" / "chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chat_cli = script()


def greedy_ids(base: Path, adapter: Path | None, history: list[Message], user: str, n: int = N) -> list[int]:
    """The greedy reply's token ids, computed here from the parts: the template rendered, tokenized, ``generate``
    with the folder's EOS (the EOS included)."""
    tokenizer = load_tokenizer(base, 300)
    model = LoRATransformer.from_pretrained(base, lora_r=0).eval()
    if adapter is not None:
        model.load_adapter(adapter)
    text = load_chat_template(base).render([*history, Message("user", user)], add_generation_prompt=True)
    ids = tokenizer.encode(text)
    eos = list(tokenizer.special_tokens.eos_ids) or None
    return model.generate(torch.tensor([ids]), n, temperature=0, eos_token_id=eos)[0, len(ids) :].tolist()


def expected(base: Path, adapter: Path | None, history: list[Message], user: str, n: int = N) -> str:
    """The text the chat must show: :func:`greedy_ids`' up to the EOS."""
    tokenizer = load_tokenizer(base, 300)
    return tokenizer.decode(tokenizer.special_tokens.until_eos(greedy_ids(base, adapter, history, user, n)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """``base/`` (a tiny Llama folder whose EOS is the 3rd token adapter a's greedy first reply makes),
    ``nostop/`` (the same weights, no EOS), adapters ``a/``, ``b/`` (naming ``base`` as theirs), ``other/``
    (another base's weights)."""
    root = tmp_path_factory.mktemp("chat")
    base = make_llama_folder(root / "base", max_position_embeddings=256)
    for name in ("a", "b"):
        model = LoRATransformer.from_pretrained(base, lora_r=4, lora_targets="q,k,v,o")
        torch.manual_seed(ord(name))
        with torch.no_grad():
            for _, layer in model.lora_layers():
                layer.lora_B.normal_(std=0.3)
        model.save_adapter(root / name, extra={"base_checkpoint": str(base)})
    shutil.copytree(base, root / "nostop")
    (root / "nostop" / "generation_config.json").write_text(json.dumps({"eos_token_id": []}))
    free = greedy_ids(root / "nostop", root / "a", [], "Hi")
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [free[2]]}))
    (root / "free.json").write_text(json.dumps(free))
    make_llama_folder(root / "other", seed=1, max_position_embeddings=256)
    return root


def test_two_turns_stop_at_eos_reset_and_adapter_switching_in_process(folders, capsys):
    chat = chat_cli.load_chat(chat_cli.parse_args(["--adapter", str(folders / "a"), "--adapter", str(folders / "b"),
                                                   "--temperature", "0", "--max_new_tokens", str(N)]))  # fmt: skip
    assert chat.adapters == ["a", "b"] and chat.adapter == "a" and chat.end_of_turn == "<|end|>"
    shown = []
    first = chat.reply("Hi", shown.append)
    assert first == expected(folders / "base", folders / "a", [], "Hi") == "".join(shown)
    free = json.loads((folders / "free.json").read_text())  # what it says without an EOS
    stop = free.index(free[2])  # the EOS: the 3rd token (or the same token earlier)
    assert first == load_tokenizer(folders / "base", 300).decode(free[:stop]) and stop < len(free) == N
    history = [Message("user", "Hi"), Message("assistant", first)]
    second = chat.reply("And then?", shown.append)
    assert second == expected(folders / "base", folders / "a", history, "And then?")
    assert chat.history == [*history, Message("user", "And then?"), Message("assistant", second)]
    assert chat.command("/reset") and chat.history == []
    assert chat.command("/adapter b") and chat.reply("Hi", shown.append) == expected(
        folders / "base", folders / "b", [], "Hi"
    )
    assert chat.command("/reset") and chat.command("/adapter none")
    assert chat.reply("Hi", shown.append) == expected(folders / "base", None, [], "Hi")
    assert chat.command("/adapter") and not chat.command("/exit")
    out = capsys.readouterr().out
    assert "(conversation forgotten)" in out and "  a\n  b\n* none (the base alone)\n" in out


def test_ctrl_c_in_a_reply_keeps_what_was_said_and_the_next_turn_works(folders):
    chat = chat_cli.load_chat(chat_cli.parse_args(["--base", str(folders / "nostop"), "--adapter", str(folders / "a"),
                                                   "--temperature", "0", "--max_new_tokens", "40"]))  # fmt: skip
    said = []

    def interrupt_at_the_5th(text: str) -> None:
        said.append(text)
        if len(said) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.reply("Hi", interrupt_at_the_5th)
    assert chat.history[0] == Message("user", "Hi") and chat.history[1].content.startswith("".join(said))
    assert all(not layer._per_row for _, layer in chat.model.lora_layers()) and chat.model.fused_qkv
    history = list(chat.history)
    assert chat.reply("More", lambda t: None) == expected(
        folders / "nostop", folders / "a", history, "More", 40
    )


def test_reply_text_holds_back_half_characters_and_the_end_of_turn_string():
    tok = ByteTokenizer()
    reply = chat_cli.ReplyText(tok.decode, "<|end|>")
    pieces = [reply.add(b) for b in "é <|x <|en".encode()]
    assert "".join(p for p, _ in pieces) == "é <|x " and not any(e for _, e in pieces)
    assert pieces[0] == ("", False) and pieces[1] == (
        "é",
        False,
    )  # the 2-byte character waits for its 2nd byte
    rest = []
    for b in b"d|>after":
        rest.append(reply.add(b))
        if rest[-1][1]:
            break
    assert rest == [("", False), ("", False), ("", True)]  # it ends at the end-of-turn string, not shown
    assert reply.text == "é <|x " and reply.rest() == ""


def test_prompt_answers_once_and_exits(folders):
    cmd = [sys.executable, str(ROOT / "scripts" / "chat.py"), "--adapter", str(folders / "a"), "--prompt", "Hi",
           "--temperature", "0", "--max_new_tokens", str(N)]  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=180, stdin=subprocess.DEVNULL
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected(folders / "base", folders / "a", [], "Hi") + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "{root}/nowhere", "--prompt", "Hi"], "nowhere: no such adapter folder"),
        (["--base", "{root}/other", "--adapter", "{root}/a", "--prompt", "Hi"], "other base weights"),
        (["--base", "{root}/base", "--prompt", " "], "--prompt must not be empty"),
        (
            ["--adapter", "{root}/a", "--chat_template", "{root}/none.jinja", "--prompt", "Hi"],
            "chat template not found",
        ),
        (
            ["--adapter", "{root}/a", "--temperature", "-1", "--prompt", "Hi"],
            "--temperature must be 0 (greedy)",
        ),
        (["--prompt", "Hi"], "give --base, or an --adapter"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(folders, capsys, args, message):
    assert chat_cli.main([a.format(root=folders) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


class Terminal:
    """A child process on a pseudo-terminal: ``send`` types, ``expect`` reads until a text appears."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
                                     start_new_session=True)  # fmt: skip
        os.close(slave)
        self.fd, self.buf, self.pending = master, "", ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the child has gone: EIO
            return False
        text = self.pending + self.decoder.decode(data)
        self.pending = "\r" if text.endswith("\r") else ""  # its "\n" may come in the next read
        self.buf += text[: len(text) - len(self.pending)].replace("\r\n", "\n")  # the terminal's newlines
        return bool(data)

    def expect(self, text: str, timeout: float = 120) -> str:
        """Everything up to and including ``text`` (consumed)."""
        deadline = time.monotonic() + timeout
        while text not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0 and (self.read(min(left, 1.0)) or self.proc.poll() is None), (text, self.buf)
        i = self.buf.index(text) + len(text)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> tuple[int, str]:
        rc = self.proc.wait(timeout=60)
        os.close(self.fd)
        return rc, self.proc.stderr.read().decode()


def test_a_conversation_through_a_terminal(folders):
    base, a, b = folders / "base", folders / "a", folders / "b"
    term = Terminal([sys.executable, str(ROOT / "scripts" / "chat.py"), "--adapter", str(a), "--adapter", str(b),
                     "--temperature", "0", "--max_new_tokens", str(N)])  # fmt: skip
    try:
        term.expect("> ")
        term.send("Hi\n")
        first = expected(base, a, [], "Hi")
        assert term.expect("\n> ") == f"Hi\n{first}\n> "  # the echo, the reply (stopped at EOS), the prompt
        term.send("And then?\n")
        second = expected(base, a, [Message("user", "Hi"), Message("assistant", first)], "And then?")
        assert term.expect("\n> ") == f"And then?\n{second}\n> "
        term.send("/reset\n")
        term.expect("(conversation forgotten)\n> ")
        term.send("/adapter b\n")
        term.expect("(answering with b)\n> ")
        term.send("Hi\n")
        assert term.expect("\n> ") == f"Hi\n{expected(base, b, [], 'Hi')}\n> "
        term.send("/adapter\n")
        assert term.expect("> ") == "/adapter\n  a\n* b\n  none (the base alone)\n> "
        term.send("/exit\n")
    finally:
        rc, err = term.close()
    assert rc == 0 and "Traceback" not in err and "error" not in err, err


def test_ctrl_c_through_a_terminal_stops_the_reply_not_the_chat(folders):
    term = Terminal([sys.executable, str(ROOT / "scripts" / "chat.py"), "--base", str(folders / "nostop"), "--adapter",
                     str(folders / "a"), "--temperature", "0", "--max_new_tokens", "100000"])  # fmt: skip
    try:
        for turn in ("Hi", "More"):  # a reply of 100000 tokens: stopped, twice, the chat goes on
            term.expect("> ")
            term.send(f"{turn}\n")
            term.expect(f"{turn}\n")
            deadline = time.monotonic() + 60
            while len(term.buf) < 20 and time.monotonic() < deadline:  # the reply is being shown
                term.read(1.0)
            assert len(term.buf) >= 20, term.buf
            term.proc.send_signal(signal.SIGINT)
            term.expect(" [stopped]\n")
        term.expect("> ")
        term.proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt: the chat ends
    finally:
        rc, err = term.close()
    assert rc == 0 and "Traceback" not in err and "error" not in err, err
