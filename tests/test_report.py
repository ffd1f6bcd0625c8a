"""report.html (lora/report.py): a real run's page, read back with the standard library's HTML parser, holds
the run's own numbers and pictures and nothing from the network; a resumed run and visualize_lora.py write it
again; compare_methods.py and sweep.py write one for their runs; text from the run is escaped."""

import base64
import dataclasses
import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script
from safetensors.torch import load_file

from lora.application import run as run_training
from lora.lora_layer import lora_scaling
from lora.report import parse_samples, read_run, render_run, render_summary, write_summary_report
from lora.train_lora import main
from tests.conftest import ON_BASE_FLAGS, task_flags

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ["What was trained", "The frozen base against the adapted model", "Training curves", "The adapter",
            "Settings, and the command that reproduces the run"]  # fmt: skip
pytestmark = pytest.mark.usefixtures("one_thread")


class Page(HTMLParser):
    """What a reader sees of a page: headings, the text of elements by id, tables (rows of cell texts), the
    images' sources, the links, and all text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.headings, self.ids, self.tables, self.images, self.links, self.text = [], {}, [], [], [], []
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of the open elements that capture text
        self._cell = False  # inside a table cell
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.images += [a["src"]] if tag == "img" else []
        self.links += [a["href"]] if tag == "a" else []
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
            self._cell = True
        if "id" in a:
            self.ids[a["id"]] = ""
        if "id" in a or tag in ("h1", "h2", "h3"):
            self._open.append((tag, a.get("id")))
            if tag in ("h1", "h2", "h3"):
                self.headings.append("")

    def handle_endtag(self, tag):
        self._cell = False if tag in ("td", "th") else self._cell
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data):
        self.text.append(data)
        for _, ident in self._open:
            if ident is not None:
                self.ids[ident] += data
            else:
                self.headings[-1] += data
        if self._cell:
            self.tables[-1][-1][-1] += data

    def table(self, first_header: str) -> list[list[str]]:
        return next(t for t in self.tables if t and t[0] and t[0][0] == first_header)


def pngs(page: Page) -> list[bytes]:
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in page.images), [src[:40] for src in page.images]
    images = [base64.b64decode(src[len(prefix) :], validate=True) for src in page.images]
    assert all(png[:8] == PNG_MAGIC for png in images)
    return images


def self_contained(text: str) -> None:
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower() and "url(" not in text.lower()


def script(name: str):
    return load_script(name).main


@pytest.fixture(scope="module")
def run(tmp_path_factory, base) -> Path:
    """A finished tiny rot13 run on the random base, with checkpoints at steps 8 and 12."""
    root = tmp_path_factory.mktemp("report") / "runs"
    argv = [*ON_BASE_FLAGS, "--output_dir", str(root), "--base_checkpoint", str(base), "--run_name", "rep",
            "--save_every", "4"]  # fmt: skip
    assert main(argv) == 0
    return root / "rep"


def test_a_run_s_report_holds_its_own_numbers_and_pictures(run):
    text = (run / "report.html").read_text(encoding="utf-8")
    self_contained(text)
    page = Page(text)
    metrics = json.loads((run / "metrics.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert page.headings[0] == "rep" and [h for h in page.headings if h in SECTIONS] == SECTIONS
    # what was trained: the count metrics.json holds, which is the adapter file's LoRA numbers
    tensors = load_file(run / "adapter_model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == metrics["trainable_params"] == 1 * 2 * 8 * (32 + 32)
    assert page.ids["trainable-params"] == f"{metrics['trainable_params']:,}"
    assert page.ids["lora-r"] == str(config["lora_r"]) == "8"
    assert metrics["base_fingerprint"] in text and str(metrics["base_checkpoint"]) in text
    # the frozen base against the adapted model, as metrics.json has them
    assert page.ids["base-metric"] == f"{metrics['base_metric']:.4f}"
    assert page.ids["final-metric"] == f"{metrics['final_metric']:.4f}"
    loss = page.table("")[2]
    assert loss == ["validation loss", f"{metrics['base_val_loss']:.4f}", f"{metrics['final_val_loss']:.4f}"]
    # the samples side by side: samples.txt's table, row for row
    rows = [line.split() for line in (run / "samples.txt").read_text().splitlines()[4:] if line.strip()]
    samples = page.table("input")
    assert samples[0] == ["input", "expected", "frozen base", "adapted", "matches"]
    assert [r[:4] for r in samples[1:]] == [r[:4] for r in rows] and len(rows) == 12
    assert [r[4] == "✓" for r in samples[1:]] == [r[1] == r[3] for r in rows]
    # the training curves, embedded as they are in the folder
    assert pngs(page) == [(run / "training_curves.png").read_bytes()]
    # the adapter's size on disk, and each module's ||scaling B A||_F from the file's tensors
    stored = sum((run / f).stat().st_size for f in ("adapter_model.safetensors", "adapter_config.json"))
    assert page.ids["stored-bytes"] == f"{stored:,}"
    norms = page.table("module")[1:]
    scaling = lora_scaling(8, 16.0)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    assert [row[0] for row in norms] == modules == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj"]
    for row, module in zip(norms, modules, strict=True):
        delta = scaling * tensors[f"{module}.lora_B"].double() @ tensors[f"{module}.lora_A"].double()
        assert row[1] == "8" and float(row[2]) == pytest.approx(
            float(torch.linalg.matrix_norm(delta)), rel=1e-3
        )
    # the settings, and the command that trains the run again
    assert page.ids["command"] == f"python lora/train_lora.py --config {run / 'config.yaml'}"
    settings = "".join(page.text)
    assert all(key in settings for key in config)


def test_a_text_run_shows_its_samples_side_by_side(tmp_path, base):
    data = tmp_path / "notes.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    flags = [*task_flags(ON_BASE_FLAGS, "text"), "--output_dir", str(tmp_path / "runs"), "--base_checkpoint",
             str(base), "--train_file", str(data), "--run_name", "t"]  # fmt: skip
    assert main(flags) == 0
    folder = tmp_path / "runs" / "t"
    text = (folder / "report.html").read_text(encoding="utf-8")
    self_contained(text)
    page, metrics = Page(text), json.loads((folder / "metrics.json").read_text())
    assert page.ids["final-metric"] == f"{metrics['final_metric']:.4f}" and "bits_per_byte" in text
    samples = page.table("prompt")
    assert samples[0] == ["prompt", "frozen base", "adapted"] and len(samples) == 1 + 4
    written = (folder / "samples.txt").read_text()
    first = written.split("--- base:\n")[1].split("\n--- adapted:\n")
    assert samples[1][0].startswith("prompt 'def '") and samples[1][1] == first[0]
    assert samples[1][2] == first[1].split("\n\n=== ")[0]


def test_a_resumed_run_writes_its_report_again(run, tmp_path):
    folder = tmp_path / "rep"
    shutil.copytree(run, folder)
    (folder / "report.html").write_text("stale")
    assert main(["--resume", str(folder / "checkpoint-0000008.safetensors")]) == 0
    text = (folder / "report.html").read_text(encoding="utf-8")
    page, metrics = Page(text), json.loads((folder / "metrics.json").read_text())
    assert page.ids["final-metric"] == f"{metrics['final_metric']:.4f}"
    assert f"{metrics['steps']} steps, {metrics['wall_time_s']:,.1f} s" in page.text
    assert f"--config {folder / 'config.yaml'}" in text  # the resumed folder's own settings


def test_visualize_lora_puts_its_pictures_in_the_report(run, tmp_path):
    folder = tmp_path / "rep"
    shutil.copytree(run, folder)
    assert script("visualize_lora")(["--run", str(folder)]) == 0
    page = Page((folder / "report.html").read_text(encoding="utf-8"))
    assert "Inside the adapter (scripts/visualize_lora.py)" in page.headings
    names = ["weights.png", "spectrum.png", "update_size.png", "amplification.png"]
    assert [h for h in page.headings if h.endswith(".png")] == names
    assert pngs(page)[1:] == [(folder / "pictures" / n).read_bytes() for n in names]


def test_text_from_the_run_is_escaped(run):
    hostile = "<script>alert(1)</script>"
    data = read_run(run)
    data = dataclasses.replace(
        data, folder=run.parent / "<script>alert(1)", config={**data.config, "train_file": hostile},
        metrics={**data.metrics, "tokenizer": f'"{hostile}'},
        samples=f"# {hostile}\n\n=== prompt {hostile}\n--- base:\n{hostile}\n--- adapted:\n</pre>{hostile}\n",
    )  # fmt: skip
    text = render_run(data)
    assert "<script" not in text and "&lt;script&gt;" in text
    page = Page(text)
    assert page.headings[0] == "<script>alert(1)" and page.table("prompt")[1] == [
        f"prompt {hostile}",
        hostile,
        f"</pre>{hostile}",
    ]
    summary = render_summary(hostile, [{"name": hostile, "link": f'x"{hostile}', "metrics": data.metrics,
                                        "config": data.config}], {})  # fmt: skip
    assert "<script" not in summary and Page(summary).links == [f'x"{hostile}']


def test_parse_samples_reads_every_format_the_runs_write():
    chat = ("# instruct\n# chat template: built-in\n# held-out prompts\n\n=== user: 2+2?\n--- expected: 4\n"
            "--- base: 'five'  (no end-of-turn)\n--- adapted: '4'\n\n=== user: hi\n--- expected: hello\n"
            "--- base: ''\n--- adapted: 'hello'\n")  # fmt: skip
    notes, columns, rows = parse_samples(chat)
    assert notes == ["instruct", "chat template: built-in", "held-out prompts"]
    assert columns == ["prompt", "expected", "base", "adapted"]
    assert rows == [
        ["user: 2+2?", "4", "'five'  (no end-of-turn)", "'4'"],
        ["user: hi", "hello", "''", "'hello'"],
    ]
    cells = [["input", "expected", "base", "adapted"], ["ab", "ba", " a�", "ba"], ["cd", "dc", "cd", "c c"]]
    lines = [" ".join(f"{c:<10}" for c in row) for row in cells]  # as lora/application.py writes them
    table = "# rot13\n\n" + "\n".join([lines[0], lines[1] + " ok", lines[2]]) + "\n"
    assert parse_samples(table)[1:] == (["input", "expected", "base", "adapted", "matches"],
                                        [["ab", "ba", " a�", "ba", "✓"], ["cd", "dc", "cd", "c c", ""]])  # fmt: skip
    assert parse_samples(table.replace(" ok", " no")) is None  # rows that do not fit: shown as they are
    assert parse_samples("# x\n\ninput   expected\nab\n") is None


def test_a_summary_links_each_run_s_report_and_holds_their_numbers(run, tmp_path):
    full = tmp_path / "runs" / "full"
    full.mkdir(parents=True)
    metrics = {
        **json.loads((run / "metrics.json").read_text()),
        "final_metric": 0.25,
        "trainable_params": 23008,
    }
    (full / "metrics.json").write_text(json.dumps(metrics))
    (full / "config.yaml").write_text(yaml.safe_dump({"method": "full", "learning_rate": 1e-3}))
    out = tmp_path / "summary"
    out.mkdir()
    (out / "curves.png").write_bytes((run / "training_curves.png").read_bytes())
    write_summary_report(out, "two runs", {"r8": run, "full": full, "missing": tmp_path / "none"},
                         ["curves.png", "absent.png"])  # fmt: skip
    text = (out / "report.html").read_text(encoding="utf-8")
    self_contained(text)
    page = Page(text)
    assert len(page.links) == 1 and not Path(page.links[0]).is_absolute()  # the run with a report
    assert (out / page.links[0]).resolve() == (run / "report.html").resolve()
    rows = page.table("run")
    own = json.loads((run / "metrics.json").read_text())
    assert [r[0] for r in rows[1:]] == ["r8", "full"]  # a run without metrics.json is left out
    assert rows[1][1:8] == ["LoRA", "8", "0.003", own["metric_name"], f"{own['base_metric']:.4f}",
                            f"{own['final_metric']:.4f}", f"{own['trainable_params']:,}"]  # fmt: skip
    assert rows[2][1:4] == ["full", "-", "0.001"] and rows[2][6:8] == ["0.2500", "23,008"]
    assert pngs(page) == [(run / "training_curves.png").read_bytes()]


def test_compare_methods_writes_a_report_of_its_runs(tmp_path, base, monkeypatch):
    script("compare_methods")
    module = sys.modules["compare_methods"]

    def in_process(cfg, folder):  # the script's own run, without a fresh process for each (seconds saved)
        run_training(cfg)
        read = lambda name: json.loads((folder / name).read_text())  # noqa: E731
        return {"metrics": read("metrics.json"), "history": read("history.json"), "peak_rss_mib": 0.0}

    monkeypatch.setattr(module, "run_method", in_process)
    out = tmp_path / "runs"
    assert module.main([*ON_BASE_FLAGS, "--max_steps", "4", "--output_dir", str(out), "--base_checkpoint",
                        str(base)]) == 0  # fmt: skip
    page = Page((out / "compare" / "report.html").read_text(encoding="utf-8"))
    assert page.links == ["../compare-lora/report.html", "../compare-full/report.html"]
    assert all((out / "compare" / link).is_file() for link in page.links)
    full = json.loads((out / "compare-full" / "metrics.json").read_text())
    rows = page.table("run")
    assert rows[2][:2] == ["full fine-tuning", "full"] and rows[2][6] == f"{full['final_metric']:.4f}"
    assert pngs(page) == [(out / "compare" / "comparison.png").read_bytes()]


def test_sweep_writes_a_report_of_its_runs(tmp_path, base):
    out = tmp_path / "runs"
    assert script("sweep")(["--mode", "grid", "--ranks", "1,2", "--targets", "v", "--seeds", "0", *ON_BASE_FLAGS,
                            "--max_steps", "4", "--output_dir", str(out), "--base_checkpoint", str(base)]) == 0  # fmt: skip
    folder = out / "sweep-grid"
    page = Page((folder / "report.html").read_text(encoding="utf-8"))
    assert page.links == ["runs/v-r1-s0/report.html", "runs/v-r2-s0/report.html"]
    assert all((folder / link).is_file() for link in page.links)
    results = json.loads((folder / "results.json").read_text())["cells"]
    rows = page.table("run")[1:]
    assert [row[2] for row in rows] == ["1", "2"]
    assert [row[6] for row in rows] == [f"{results[k]['metric']:.4f}" for k in ("v-r1-s0", "v-r2-s0")]
    assert pngs(page) == [(folder / name).read_bytes() for name in ("metric_vs_rank.png", "heatmap.png")]


def test_a_report_that_fails_costs_the_run_nothing(tiny_flags, tmp_path, monkeypatch, capsys):
    """report.html is a view of the run's files: if it cannot be written, the run stays, with one warning line."""
    import lora.application as application
    from lora.train_lora import main

    def broken(*args, **kwargs):
        raise ValueError("no page today\nsecond line")

    monkeypatch.setattr(application, "write_run_report", broken)
    assert main([*tiny_flags, "--run_name", "r", "--max_steps", "2"]) == 0
    folder = tmp_path / "runs" / "r"
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "metrics.json").is_file()
    assert not (folder / "report.html").exists()
    assert "warning: report.html not written: no page today\n" in capsys.readouterr().err
