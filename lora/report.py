"""A run at a glance: ``report.html``, one self-contained page (CSS inline, pictures as ``data:`` URIs, no
script, no external address) that shows what was trained, the frozen base against the adapted model, the
training curves, the adapter's size and per-module update sizes, and the settings that reproduce the run.

The page is a view of the run folder: :func:`read_run` reads it (metrics.json, config.yaml, samples.txt,
training_curves.png, the adapter, and ``pictures/`` of ``scripts/visualize_lora.py`` when there),
:func:`render_run` turns that into HTML (pure; every text through ``html.escape``), and
:func:`write_run_report` writes it atomically. :func:`write_summary_report` writes the page of several runs
(a comparison, a sweep): a table of their numbers linking to each run's own report.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora.analysis import update_norm
from lora.files import atomic_write_bytes, read_json
from lora.formats import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter_folder
from lora.lora_layer import lora_scaling
from lora.run_folder import RunFolder

__all__ = ["REPORT_NAME", "RunReport", "format_metric", "parse_samples", "read_run", "render_run",
           "render_summary", "write_run_report", "write_summary_report"]  # fmt: skip

REPORT_NAME = "report.html"
# scripts/visualize_lora.py's pictures in the order it explains them; any other PNG there follows
PICTURES = ("weights.png", "spectrum.png", "update_size.png", "amplification.png", "subspace_similarity.png")
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
 background:#f3f4f6;margin:0}
main{max-width:1100px;margin:0 auto;padding:28px 36px 48px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:0}
.sub{color:#57606a;margin:2px 0 20px}
h2{font-size:19px;border-bottom:1px solid #d0d7de;padding-bottom:6px;margin:34px 0 12px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:12px}
.card{border:1px solid #d0d7de;border-radius:8px;padding:10px 14px}
.card .k{color:#57606a;font-size:13px}
.card .v{font-size:21px;font-weight:600}
table{border-collapse:collapse;font-size:14px;margin:4px 0}
th,td{border-bottom:1px solid #e6e9ed;padding:5px 12px 5px 0;text-align:left;vertical-align:top}
th{color:#57606a;font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;padding-left:12px}
table.kv{width:100%}
table.kv th{width:190px;font-weight:normal}
code,pre,.m{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
pre{background:#f6f8fa;padding:10px 12px;border-radius:6px;white-space:pre-wrap;overflow-wrap:anywhere;
 margin:4px 0}
td pre{background:none;padding:0;margin:0}
table.samples{width:100%}
.ok{color:#1a7f37;font-weight:600}
img{max-width:100%;border:1px solid #e6e9ed;border-radius:6px;margin:6px 0}
.bar{background:#2f81f7;height:11px;border-radius:2px;min-width:1px}
.good{color:#1a7f37}.bad{color:#cf222e}.note{color:#57606a;font-size:13px}
.settings{columns:3 260px;font-size:13px;column-gap:28px}
.settings div{break-inside:avoid;display:flex;gap:8px;border-bottom:1px solid #f0f2f4;padding:1px 0}
.settings span:first-child{color:#57606a;flex:0 0 180px;overflow-wrap:anywhere}
"""


def e(value: object) -> str:
    """``value`` as text made safe for HTML (quotes too)."""
    return html.escape(str(value), quote=True)


def format_metric(value: float | None) -> str:
    """A metric or loss as the report writes it: four decimals (``-`` where there is none)."""
    return "-" if value is None else f"{value:.4f}"


def _size(n: int) -> str:
    """``n`` bytes in the largest unit that keeps it at least 1: ``812 bytes``, ``34.1 KiB``, ``1.2 GiB``."""
    unit = next((p for p in (3, 2, 1) if n >= 1024**p), 0)
    return f"{n:,} bytes" if unit == 0 else f"{n / 1024**unit:,.1f} {('KiB', 'MiB', 'GiB')[unit - 1]}"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool], cls: str = ""
) -> str:
    """A table of cells that are HTML already (escape them first); ``numeric`` columns align right."""
    n = ["n" if x else "" for x in numeric]
    head = "".join(f'<th class="{c}">{e(h)}</th>' for h, c in zip(header, n, strict=True))
    body = "".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' for v, c in zip(r, n, strict=True)) + "</tr>"
                   for r in rows)  # fmt: skip
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{CSS}</style></head><body><main>{body}</main></body></html>\n")  # fmt: skip


FIELD = re.compile(r"--- ([a-z ]+):(?: (.*))?")


def parse_samples(text: str) -> tuple[list[str], list[str], list[list[str]]] | None:
    """samples.txt as ``(notes, columns, rows)``: its leading ``#`` lines, and a table. Blocks of a prompt
    (``=== ...``) and its outputs (``--- base:``, ``--- adapted:``, ``--- expected:``, each text on the line
    or on the lines below) give a column per output; a table of columns padded to one width, one space apart,
    each row marked ``ok`` where it matches (the cipher tasks'), gives its own. ``None`` when the text is neither (the report shows it as it is)."""
    lines = text.rstrip("\n").splitlines()
    notes = []
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        line = lines.pop(0)
        notes += [line.lstrip("# ")] if line.strip() else []
    if any(line.startswith("=== ") for line in lines):
        columns, blocks, key = ["prompt"], [], "prompt"
        for line in lines:
            match = FIELD.fullmatch(line)
            if line.startswith("=== "):
                blocks.append({"prompt": line[4:]})
                key = "prompt"
            elif match and blocks:
                key = match[1]
                columns += [] if key in columns else [key]
                blocks[-1][key] = match[2] or ""
            elif blocks:
                blocks[-1][key] += ("\n" if blocks[-1][key] else "") + line
        return notes, columns, [[b.get(c, "").strip("\n") for c in columns] for b in blocks]
    header, *data = [line for line in lines if line.strip()] or [""]
    starts = [m.start() for m in re.finditer(r"\S+", header)]  # columns padded to one width, one space apart
    width = starts[1] - starts[0] - 1 if len(starts) > 1 else 0
    if width < 1 or any(b - a != width + 1 for a, b in itertools.pairwise(starts)):
        return None
    end = starts[-1] + width
    if not all(len(row) >= end and row[end:].strip() in ("", "ok") for row in data):
        return None
    rows = [
        [row[a : a + width].rstrip() for a in starts] + ["✓" if row[end:].strip() else ""] for row in data
    ]
    return notes, [*header.split(), "matches"], rows


@dataclass
class RunReport:
    """What a run's page shows, read from its folder: ``metrics`` (metrics.json), ``config`` (config.yaml),
    ``adapter`` (adapter_config.json; None for full fine-tuning), ``update_norms`` (module -> ``(r,
    ||scaling B A||_F)``), ``stored_bytes`` (the adapter's files, or the model's), the samples' text, the
    training curves and ``pictures`` (PNG bytes by name), and ``folder``: where the run ends up."""

    folder: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    adapter: dict[str, Any] | None = None
    update_norms: dict[str, tuple[int, float]] = field(default_factory=dict)
    stored_bytes: int = 0
    samples: str | None = None
    curves: bytes | None = None
    pictures: dict[str, bytes] = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The command that trains this run again (from the project folder): its resolved config.yaml."""
        processes = int(self.metrics.get("world_size") or 1)
        launcher = f"torchrun --nproc_per_node {processes}" if processes > 1 else "python"
        return f"{launcher} lora/train_lora.py --config {shlex.quote(str(self.folder / 'config.yaml'))}"


def read_run(folder: Path, final: Path | None = None) -> RunReport:
    """The report's data from the run ``folder`` (``final``: where the run will end up, default ``folder``)."""
    metrics = read_json(folder / "metrics.json")
    config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
    report = RunReport(final or folder, metrics, config)
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        adapter = read_adapter_folder(folder)
        report.adapter = adapter.config
        report.update_norms = {name: (spec.r, update_norm(*spec.factors(), spec.scaling))
                               for name, spec in sorted(adapter.to_adapter().layers.items())}  # fmt: skip
        report.stored_bytes = sum(
            (folder / f).stat().st_size for f in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
        )
    elif (folder / "model").is_dir():
        report.stored_bytes = sum(p.stat().st_size for p in (folder / "model").iterdir() if p.is_file())
    if (folder / "samples.txt").is_file():
        report.samples = (folder / "samples.txt").read_text(encoding="utf-8", errors="replace")
    if (folder / "training_curves.png").is_file():
        report.curves = (folder / "training_curves.png").read_bytes()
    found = sorted((folder / "pictures").glob("*.png"))
    order = {name: i for i, name in enumerate(PICTURES)}
    report.pictures = {
        p.name: p.read_bytes() for p in sorted(found, key=lambda p: (order.get(p.name, 99), p.name))
    }
    return report


def _method(r: RunReport) -> str:
    c = r.config
    if c.get("method") == "full":
        return "full fine-tuning (every weight trains)"
    parts = ["DoRA" if c.get("use_dora") else "LoRA"]
    parts += [f"init {c['lora_init']}"] if c.get("lora_init", "kaiming") != "kaiming" else []
    parts += ["rsLoRA scaling"] if c.get("use_rslora") else []
    parts += [f"LoRA+ x{c['lora_plus_ratio']:g}"] if c.get("lora_plus_ratio", 1) != 1 else []
    parts += [f"{r.adapter['base_quantization']} base"] if (r.adapter or {}).get("base_quantization") else []
    return ", ".join(parts)


def _tone(m: Mapping[str, Any]) -> str:
    """``good`` where the adapted model beats the frozen base on the metric, ``bad`` where it is worse."""
    base, final = m.get("base_metric"), m.get("final_metric")
    if base is None or final is None or base == final:
        return ""
    return "good" if (final > base) == bool(m.get("higher_is_better")) else "bad"


def _share(m: Mapping[str, Any]) -> str:
    """The trainable parameters' share of all, in percent."""
    return f"{100 * m.get('trainable_params', 0) / max(m.get('total_params') or 0, 1):.2f} %"


def _cards(r: RunReport, about: str) -> list[str]:
    """The title and four numbers: the metric before and after, the parameters, the size, the time."""
    m, lora = r.metrics, r.config.get("method") != "full"
    cards = [
        (f"{m.get('metric_name', 'metric')}: frozen base → adapted",
         f'{e(format_metric(m.get("base_metric")))} → '
         f'<span class="{_tone(m)}">{e(format_metric(m.get("final_metric")))}</span>'),
        ("trainable parameters", e(f"{m.get('trainable_params', 0):,} ({_share(m)})")),
        ("adapter on disk" if lora else "model on disk", e(_size(r.stored_bytes))),
        ("training", e(f"{m.get('steps', 0):,} steps, {m.get('wall_time_s', 0):,.1f} s")),
    ]  # fmt: skip
    return [f"<h1>{e(r.folder.name)}</h1>", f'<p class="sub">{e(about)}</p>', '<div class="cards">',
            *(f'<div class="card"><div class="k">{e(k)}</div><div class="v">{v}</div></div>' for k, v in cards),
            "</div>"]  # fmt: skip


def _trained(r: RunReport) -> list[str]:
    """What was trained: the base and its fingerprint, the task, the method, rank, alpha, targets, parameters."""
    m, c = r.metrics, r.config
    mono = lambda v: f'<span class="m">{e(v)}</span>'  # noqa: E731
    facts = [("base", mono(m.get("base_checkpoint", c.get("base_checkpoint")))),
             ("base fingerprint", mono(m.get("base_fingerprint", "-"))),
             ("task", e(m.get("task", c.get("task")))), ("method", e(_method(r)))]  # fmt: skip
    if c.get("method") != "full":
        rule = "alpha / sqrt(r)" if c.get("use_rslora") else "alpha / r"
        scale = lora_scaling(c.get("lora_r", 0), c.get("lora_alpha", 0.0), bool(c.get("use_rslora")))
        mlp = " + every MLP projection" if c.get("adapt_feedforward") else ""
        facts += [("rank r", f'<span id="lora-r">{e(c.get("lora_r"))}</span>'),
                  ("alpha", e(f"{c.get('lora_alpha'):g} (scaling {rule} = {scale:g})")),
                  ("targets", e(f"{', '.join(c.get('lora_targets', []))}{mlp} ({len(r.update_norms)} modules)"))]  # fmt: skip
    processes = m.get("world_size") or 1
    speed = f"{m.get('tokens_per_s') or 0:,.0f} tokens/s"
    peak = f", peak memory {m['peak_memory_mb']:,.0f} MiB" if m.get("peak_memory_mb") else ""
    count = f'<span id="trainable-params">{m.get("trainable_params", 0):,}</span>'
    facts += [("trainable parameters", f"{count} of {m.get('total_params', 0):,} ({e(_share(m))})"),
              ("tokenizer", e(m.get("tokenizer", "-"))),
              ("device", e(f"{m.get('device', '-')}" + (f" x {processes} processes" if processes > 1 else ""))),
              ("speed", e(speed + peak))]  # fmt: skip
    rows = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in facts)
    return ["<h2>What was trained</h2>", f'<table class="kv">{rows}</table>']


def _against_base(r: RunReport) -> list[str]:
    """The metric and validation loss of the frozen base and the adapted model, and the samples side by side."""
    m, metric = r.metrics, r.metrics.get("metric_name", "metric")
    rows = [[e(metric), f'<span id="base-metric">{e(format_metric(m.get("base_metric")))}</span>',
             f'<span id="final-metric" class="{_tone(m)}">{e(format_metric(m.get("final_metric")))}</span>'],
            ["validation loss", e(format_metric(m.get("base_val_loss"))), e(format_metric(m.get("final_val_loss")))]]  # fmt: skip
    if "generated_exact_match" in m:  # chat tasks: answers generated, compared whole
        rows.append(["generated answers, exact match", e(format_metric(m.get("base_generated_exact_match"))),
                     e(format_metric(m["generated_exact_match"]))])  # fmt: skip
    better = "higher" if m.get("higher_is_better") else "lower"
    out = ["<h2>The frozen base against the adapted model</h2>",
           _table(["", "frozen base", "adapted"], rows, [False, True, True]),
           f'<p class="note">{e(metric)}: {better} is better; both measured on the same held-out data.</p>']  # fmt: skip
    parsed = parse_samples(r.samples) if r.samples is not None else None
    if parsed is not None:
        notes, columns, table = parsed
        header = ["frozen base" if col == "base" else col for col in columns]
        cells = [[f'<pre class="{"ok" if col == "matches" else ""}">{e(v)}</pre>' for col, v in zip(columns, row, strict=True)]
                 for row in table]  # fmt: skip
        out += ["<h3>Samples</h3>", *(f'<p class="note">{e(n)}</p>' for n in notes[1:]),
                _table(header, cells, [False] * len(header), "samples")]  # fmt: skip
    elif r.samples is not None:
        out += ["<h3>Samples</h3>", f"<pre>{e(r.samples)}</pre>"]
    return out


def _stored(r: RunReport) -> list[str]:
    """The adapter's (or model's) size on disk and each module's update size, with a bar."""
    lora = r.config.get("method") != "full"
    files = f"{ADAPTER_WEIGHTS_NAME} + {ADAPTER_CONFIG_NAME}" if lora else "model/"
    out = ["<h2>The adapter</h2>" if lora else "<h2>The model</h2>",
           f'<p>{e(files)}: <span id="stored-bytes">{r.stored_bytes:,}</span> bytes ({e(_size(r.stored_bytes))}) on disk.</p>']  # fmt: skip
    if r.update_norms:
        top = max(v for _, v in r.update_norms.values()) or 1.0
        rows = [[f'<span class="m">{e(n)}</span>', str(k), f"{v:.4g}",
                 f'<div class="bar" style="width:{240 * v / top:.0f}px"></div>']
                for n, (k, v) in r.update_norms.items()]  # fmt: skip
        dora = " (DoRA's magnitude rescaling not included)" if r.config.get("use_dora") else ""
        out += [f"<p>How large each module's update is: ||scaling·B·A||<sub>F</sub>{dora}.</p>",
                _table(["module", "r", "||ΔW||_F", ""], rows, [False, True, True, False])]  # fmt: skip
    return out


def _settings(r: RunReport) -> list[str]:
    """The command that trains the run again, and every setting of its config.yaml."""
    out = ["<h2>Settings, and the command that reproduces the run</h2>", f'<pre id="command">{e(r.command)}</pre>',
           '<p class="note">From the project folder; config.yaml holds every setting below. The new run is '
           f"written beside this one (as {e(r.folder.name)}-2), unless its settings say overwrite.</p>",
           '<div class="settings">']  # fmt: skip
    for key, value in r.config.items():
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        shown = shown if isinstance(shown, str) else json.dumps(shown)  # as YAML and JSON: false, null, 0.003
        out.append(f'<div><span>{e(key)}</span><span class="m">{e(shown)}</span></div>')
    return [*out, "</div>"]


def render_run(r: RunReport) -> str:
    """The run's page (HTML text)."""
    parsed = parse_samples(r.samples) if r.samples is not None else None
    about = parsed[0][0] if parsed and parsed[0] else f"task {r.metrics.get('task', r.config.get('task'))}"
    out = [*_cards(r, about), *_trained(r), *_against_base(r)]
    if r.curves is not None:
        out += ["<h2>Training curves</h2>", _img(r.curves, "training curves")]
    out += _stored(r)
    if r.pictures:
        out += ["<h2>Inside the adapter (scripts/visualize_lora.py)</h2>",
                *(f"<h3>{e(n)}</h3>{_img(png, n)}" for n, png in r.pictures.items())]  # fmt: skip
    out += _settings(r)
    return _page(f"{r.folder.name}: run report", "".join(out))


def write_run_report(folder: Path, final: Path | None = None) -> Path:
    """Write ``report.html`` into the run ``folder`` atomically (``final``: where the run will end up)."""
    return RunFolder(folder).write(REPORT_NAME, render_run(read_run(folder, final)))


def render_summary(title: str, rows: Sequence[Mapping[str, Any]], pictures: Mapping[str, bytes],
                   note: str = "") -> str:  # fmt: skip
    """The page of several runs: per run (a mapping of ``name``, ``link`` (relative path of its report, or
    None), ``metrics``, ``config``) its method, rank, learning rate, metric before and after, trainable
    parameters and time; then ``pictures``."""
    head = [
        "run",
        "method",
        "r",
        "learning rate",
        "metric",
        "frozen base",
        "adapted",
        "trainable",
        "time (s)",
    ]
    cells = []
    for row in rows:
        m, c = row["metrics"], row["config"]
        link = f'<a href="{e(row["link"])}">{e(row["name"])}</a>' if row.get("link") else e(row["name"])
        full = c.get("method") == "full"
        cells.append([link, e("full" if full else ("DoRA" if c.get("use_dora") else "LoRA")),
                      "-" if full else e(c.get("lora_r")), e(f"{c.get('learning_rate', 0):g}"),
                      e(m.get("metric_name")), e(format_metric(m.get("base_metric"))),
                      e(format_metric(m.get("final_metric"))), f"{m.get('trainable_params', 0):,}",
                      f"{m.get('wall_time_s', 0):,.1f}"])  # fmt: skip
    body = [f"<h1>{e(title)}</h1>", f'<p class="sub">{e(note)}</p>' if note else "",
            _table(head, cells, [False, False, True, True, False, True, True, True, True])]  # fmt: skip
    body += [f"<h2>{e(n)}</h2>{_img(png, n)}" for n, png in pictures.items()]
    return _page(title, "".join(body))


def write_summary_report(folder: Path, title: str, runs: Mapping[str, Path], pictures: Sequence[str] = (),
                         note: str = "") -> Path:  # fmt: skip
    """``folder/report.html`` for the finished ``runs`` (name -> run folder; one without metrics.json is left
    out), linking to each run's report by relative path, with ``folder``'s ``pictures`` that exist."""
    rows = []
    for name, run in runs.items():
        if not (run / "metrics.json").is_file():
            continue
        link = os.path.relpath(run / REPORT_NAME, folder) if (run / REPORT_NAME).is_file() else None
        rows.append({"name": name, "link": link, "metrics": json.loads((run / "metrics.json").read_text()),
                     "config": yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}})  # fmt: skip
    found = {p: (folder / p).read_bytes() for p in pictures if (folder / p).is_file()}
    return atomic_write_bytes(folder / REPORT_NAME, render_summary(title, rows, found, note).encode("utf-8"))
