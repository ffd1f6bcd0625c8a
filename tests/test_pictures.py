"""The scripts that show what LoRA does: visualize_lora.py, compare_methods.py and sweep.py, end to end on
tiny configurations, and their refusals of bad input (one line, exit 2)."""

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import load_script

from lora.train_lora import main as train
from tests.conftest import TINY_FLAGS

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.usefixtures("one_thread")


def script(name: str):
    return load_script(name).main


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base) -> Path:
    """Two LoRA runs on q and v, of ranks 8 and 2, and a full fine-tuning run, all on the random base."""
    from tests.conftest import ON_BASE_FLAGS

    root = tmp_path_factory.mktemp("runs")
    common = [
        *ON_BASE_FLAGS,
        "--output_dir",
        str(root),
        "--base_checkpoint",
        str(base),
        "--lora_targets",
        "q,v",
    ]
    assert train([*common, "--run_name", "r8"]) == 0
    assert train([*common, "--run_name", "r2", "--lora_r", "2", "--lora_alpha", "4"]) == 0
    assert train([*ON_BASE_FLAGS, "--output_dir", str(root), "--base_checkpoint", str(base), "--method", "full",
                  "--run_name", "full"]) == 0  # fmt: skip
    return root


def one_line(capsys, *needles: str, prog: str = "visualize_lora.py") -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_visualize_draws_every_picture_and_the_numbers_hold(runs, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert script("visualize_lora")(["--run", str(runs / "r8"), "--other", str(runs / "r2"), "--proj", "v",
                                     "--out", str(out)]) == 0  # fmt: skip
    for name in ("weights", "spectrum", "update_size", "amplification", "subspace_similarity"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC, name
    result = json.loads((out / "analysis.json").read_text())
    assert result["module"] == "blocks.0.attn.v_proj"
    assert {m: v["rank_of_delta"] for m, v in result["modules"].items()} == {
        "blocks.0.attn.q_proj": 8, "blocks.0.attn.v_proj": 8}  # fmt: skip
    assert all(v["relative_update"] > 0 and v["amplification"] > 0 for v in result["modules"].values())
    similarity = result["subspace_similarity"]
    assert len(similarity["phi_top_row"]) == 2 and all(0 <= v <= 1 for v in similarity["phi_top_row"])
    assert "blocks.0.attn.v_proj" in capsys.readouterr().out


def test_visualize_refuses_bad_input_naming_it(runs, tmp_path, capsys):
    visualize = script("visualize_lora")
    assert visualize(["--run", str(runs / "full")]) == 2
    one_line(capsys, f"{runs / 'full'} has no adapter", "full fine-tuning run has none")
    assert visualize(["--run", str(runs / "r8"), "--layer", "5"]) == 2
    one_line(
        capsys,
        "no adapted module for layer 5",
        "the adapted modules are blocks.0.attn.q_proj, blocks.0.attn.v_proj",
    )
    assert visualize(["--run", str(runs / "r8"), "--proj", "x"]) == 2
    one_line(capsys, "--proj must be one of q, k, v, o, fc1, fc2, gate, up, down, got 'x'")
    import torch

    from lora.lora_transformer import LoRATransformer

    torch.manual_seed(7)
    other = tmp_path / "other"
    model = LoRATransformer(
        256, d_model=32, num_heads=2, num_layers=1, max_seq_len=32, lora_r=2, lora_alpha=4
    )
    model.save_pretrained(other / "base")
    model.save_adapter(other / "adapter", extra={"base_checkpoint": str(other / "base")})
    assert visualize(["--run", str(runs / "r8"), "--other", str(other / "adapter")]) == 2
    one_line(capsys, "were trained on different bases", "subspace similarity compares adapters of one base")


def test_compare_methods_writes_one_table_and_one_picture(tmp_path, capsys):
    out = tmp_path / "runs"
    assert script("compare_methods")([*TINY_FLAGS, "--output_dir", str(out)]) == 0
    with (out / "compare" / "comparison.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["frozen base", "LoRA", "full fine-tuning"]
    assert int(rows["frozen base"]["trainable params"]) == 0
    assert 0 < int(rows["LoRA"]["trainable params"]) < int(rows["full fine-tuning"]["trainable params"])
    assert 0 < int(rows["LoRA"]["bytes stored"]) < int(rows["full fine-tuning"]["bytes stored"])
    assert float(rows["LoRA"]["peak RSS (MiB)"]) > 0 and float(rows["full fine-tuning"]["tokens/s"]) > 0
    assert (out / "compare" / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    assert "| LoRA |" in (out / "compare" / "comparison.md").read_text()
    assert json.loads((out / "compare-full" / "metrics.json").read_text())["method"] == "full"
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    compare = script("compare_methods")
    assert compare([*TINY_FLAGS, "--output_dir", str(out)]) == 2  # the earlier comparison is kept
    one_line(
        capsys, "compare-lora exists (an earlier comparison): pass --overwrite", prog="compare_methods.py"
    )
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_compare_methods_takes_a_full_fine_tuning_preset_and_says_it_runs_both(tmp_path, capsys):
    """configs/full_finetune.yaml sets method full: the comparison runs both methods whatever the preset says."""
    from lora import config

    preset = tmp_path / "full.yaml"
    preset.write_text("method: full\nlearning_rate: 1.0e-3\n")
    plan = sys.modules[script("compare_methods").__module__].plan
    cfg, flags = config.load_config_and_flags(["--config", str(preset), *TINY_FLAGS])
    with pytest.warns(UserWarning, match="the config sets method, which the comparison sets itself; ignored"):
        lora_cfg, full_cfg = plan(cfg, 3e-4, flags)
    assert (lora_cfg.method, full_cfg.method, full_cfg.learning_rate) == ("lora", "full", 3e-4)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--full_learning_rate", "nan"], "full_learning_rate must be a finite number, got nan"),
    (["--full_learning_rate", "-1"], "full_learning_rate must be"),
    (["--run_name", "mine"], "compare-lora and compare-full, started afresh: drop --run_name"),
    (["--resume", "auto"], "drop --resume"),
    (["--method", "full"], "drop --method"),
])  # fmt: skip
def test_compare_methods_refuses_before_either_run(argv, needle, tmp_path, capsys):
    out = tmp_path / "runs"
    assert script("compare_methods")([*TINY_FLAGS, "--output_dir", str(out), *argv]) == 2
    one_line(capsys, needle, prog="compare_methods.py")
    assert not out.exists()


def test_compare_methods_refuses_a_file_where_its_summary_goes_before_either_run(tmp_path, capsys):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "compare").write_text("mine")  # the summary's folder, written after both runs trained
    assert script("compare_methods")([*TINY_FLAGS, "--output_dir", str(out)]) == 2
    one_line(capsys, f"cannot create the folder {out / 'compare'}: it exists and is not a folder",
             prog="compare_methods.py")  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["compare"] and (out / "compare").read_text() == "mine"


def test_sweep_writes_its_tables_and_resumes_without_rerunning_finished_cells(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["--mode", "grid", "--ranks", "1,4", "--targets", "v,qv", "--seeds", "0,1", *TINY_FLAGS,
            "--max_steps", "4", "--output_dir", str(out)]  # fmt: skip
    assert script("sweep")(argv) == 0
    folder = out / "sweep-grid"
    saved = json.loads((folder / "results.json").read_text())
    results = saved["cells"]
    assert saved["settings"]["max_steps"] == 4 and "lora_r" not in saved["settings"]
    assert sorted(results) == sorted(f"{t}-r{r}-s{s}" for t in ("v", "qv") for r in (1, 4) for s in (0, 1))
    assert results["qv-r4-s0"]["trainable_params"] == 2 * results["v-r4-s0"]["trainable_params"]
    table = (folder / "table.md").read_text()
    assert "| q+v | 4 |" in table and "spread over 2 seeds" in table
    for name in ("metric_vs_rank.png", "heatmap.png"):
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC
    # as after an interruption: one cell missing from results.json; only that one runs again
    del results["v-r1-s1"]
    (folder / "results.json").write_text(json.dumps(saved))
    stamps = {p.name: p.stat().st_mtime_ns for p in (folder / "runs").glob("[!.]*")}
    assert script("sweep")(argv) == 0
    changed = [p.name for p in (folder / "runs").glob("[!.]*") if p.stat().st_mtime_ns != stamps[p.name]]
    assert changed == ["v-r1-s1"]
    assert len(json.loads((folder / "results.json").read_text())["cells"]) == 8
    # the same folder with other shared settings is refused, not mixed in; bad lists are one line
    sweep = script("sweep")
    capsys.readouterr()
    assert sweep([*argv, "--learning_rate", "0.01"]) == 2
    assert "holds a sweep made with other settings (learning_rate)" in capsys.readouterr().err
    for bad, needle in ((["--seeds", ""], "--seeds must list integers >= 0"), (["--ranks", "0"], "--ranks must list"),
                        (["--targets", "qq"], "each letter once")):  # fmt: skip
        assert sweep([*argv, *bad]) == 2, bad
        assert needle in capsys.readouterr().err, bad


def test_a_learning_rate_sweep_trains_each_cell_at_each_rate(tmp_path, capsys):
    """grid mode's --learning_rates: a cell per rate, each run's config.yaml and first step at its own rate (the
    warmup's first step is rate / 20), the table with a learning-rate column; bad lists and a --learning_rate
    that the cells would override are one line, before anything is written."""
    out = tmp_path / "runs"
    argv = ["--mode", "grid", "--ranks", "2", "--targets", "v", "--learning_rates", "1e-3,1e-2", "--seeds", "0",
            *TINY_FLAGS, "--max_steps", "2", "--output_dir", str(out)]  # fmt: skip
    assert script("sweep")(argv) == 0
    folder = out / "sweep-grid"
    saved = json.loads((folder / "results.json").read_text())
    assert sorted(saved["cells"]) == ["v-r2-lr0.001-s0", "v-r2-lr0.01-s0"]
    assert "learning_rate" not in saved["settings"]  # the cells' own, not a shared setting
    losses = []
    for key, lr in (("v-r2-lr0.001-s0", 1e-3), ("v-r2-lr0.01-s0", 1e-2)):
        run = folder / "runs" / key
        assert yaml.safe_load((run / "config.yaml").read_text())["learning_rate"] == lr
        assert saved["cells"][key]["learning_rate"] == lr
        history = json.loads((run / "history.json").read_text())
        assert history["lr"] == pytest.approx([lr / 20, 2 * lr / 20], rel=1e-12)  # warmup_steps 20
        losses.append(history["train_loss"][1])
    assert losses[0] != losses[1]  # the second step follows a first update of another size
    table = (folder / "table.md").read_text()
    assert "| targets | r | learning rate |" in table
    assert "| v | 2 | 0.001 |" in table and "| v | 2 | 0.01 |" in table
    sweep = script("sweep")
    capsys.readouterr()
    fresh = ["--output_dir", str(tmp_path / "other")]
    for bad, needle in ((["--learning_rates", "1e-3,x"], "--learning_rates must be comma-separated numbers"),
                        (["--learning_rates", "1e-3,0"], "--learning_rates must list finite numbers > 0"),
                        (["--learning_rates", "inf"], "--learning_rates must list finite numbers > 0"),
                        (["--learning_rates", "1e-3,0.0010000001"], "two rates that both read 0.001"),
                        (["--learning_rates", "1e-3", "--learning_rate", "0.1"],
                         "--learning_rate has no effect with --mode grid"),
                        (["--mode", "rank", "--learning_rates", "1e-3"], "--learning_rates has no effect with --mode rank"),
                        ):  # fmt: skip
        assert sweep([*argv, *bad, *fresh]) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (bad, err)
    assert not (tmp_path / "other").exists()


def test_a_preset_s_targets_are_reported_and_left_to_the_sweep_s_cells(tmp_path, capsys):
    """configs/code.yaml sets lora_targets and adapt_feedforward: a rank sweep on it says that its cells set them,
    and runs (the sweep's own docstring example); the same options given as flags are refused (below)."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("lora_targets: [q, k, v, o]\nadapt_feedforward: true\nlora_r: 4\n")
    argv = ["--mode", "rank", "--ranks", "1", "--seeds", "0", "--config", str(preset), *TINY_FLAGS,
            "--max_steps", "2", "--output_dir", str(tmp_path / "runs")]  # fmt: skip
    assert script("sweep")(argv) == 0
    err = capsys.readouterr().err
    assert "sweep.py: warning: the config sets lora_r, lora_targets, adapt_feedforward, which --mode rank sets " \
           "per cell; ignored" in err, err  # fmt: skip
    cells = json.loads((tmp_path / "runs" / "sweep-rank" / "results.json").read_text())["cells"]
    assert sorted(cells) == ["qkvo-r1-s0", "qv-r1-s0"]


@pytest.mark.parametrize(("mode", "extra", "needle"), [
    ("rank", ["--lora_r", "5"], "--lora_r has no effect with --mode rank: its cells set the rank"),
    ("rank", ["--lora_alpha", "3", "--lora_targets", "q"], "--lora_alpha, --lora_targets has no effect"),
    ("rank", ["--targets", "q"], "--targets has no effect with --mode rank"),
    ("rank", ["--mlp", "yes"], "--mlp has no effect with --mode rank"),
    ("budget", ["--ranks", "1"], "--ranks has no effect with --mode budget"),
    ("grid", ["--adapt_feedforward", "--run_name", "foo"], "--run_name, --adapt_feedforward has no effect"),
    ("grid", ["--seed", "7"], "--seed has no effect with --mode grid"),  # not taken as --seeds
    ("variants", ["--seed", "7"], "--seed has no effect with --mode variants"),
])  # fmt: skip
def test_a_sweep_refuses_the_options_its_cells_would_override(mode, extra, needle, tmp_path, capsys):
    assert script("sweep")(["--mode", mode, *TINY_FLAGS, "--output_dir", str(tmp_path / "runs"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "drop it" in err, err
    assert not (tmp_path / "runs").exists()
