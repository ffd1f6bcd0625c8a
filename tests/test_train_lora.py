"""The training application: CLI end to end, configuration precedence and errors, the trainer."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lora.train_lora as train_lora_module
from lora.config import TASKS, TrainConfig, load_config, load_yaml, resolve_config
from lora.run_folder import run_folder_name
from lora.train_lora import main
from tests.conftest import ON_BASE_FLAGS, TINY_FLAGS, task_flags

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = {"config.yaml", "history.json", "metrics.json", "training_curves.png", "adapter_config.json",
             "adapter_model.safetensors", "samples.txt"}  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cli_end_to_end_writes_the_run_folder(tiny_flags, tmp_path):
    proc = subprocess.run(
        [sys.executable, "lora/train_lora.py", *tiny_flags, "--run_name", "e2e"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "runs" / "e2e"
    assert RUN_FILES <= {p.name for p in folder.iterdir()}
    assert (folder / "training_curves.png").read_bytes()[:8] == PNG_MAGIC
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("method", "metric_name", "higher_is_better", "base_metric", "final_metric", "total_params",
                "trainable_params", "reduction_factor", "wall_time_s", "tokens_per_s"):  # fmt: skip
        assert key in metrics, key
    assert metrics["method"] == "lora" and metrics["metric_name"] == "exact_match" and metrics["steps"] == 12
    assert metrics["trainable_params"] == 1 * 2 * 8 * (32 + 32)
    assert metrics["total_params"] / metrics["trainable_params"] == pytest.approx(metrics["reduction_factor"])
    history = json.loads((folder / "history.json").read_text())
    assert history["step"] == list(range(1, 13)) and len(history["train_loss"]) == 12
    assert sum(v is not None for v in history["val_loss"]) == 3  # steps 4, 8, 12
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["max_steps"] == 12 and saved["run_name"] == "e2e"
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["lora_r"] == 8 and adapter["lora_targets"] == ["q", "v"] and adapter["base_fingerprint"]
    bases = list((tmp_path / "runs" / "bases").glob("[!.]*"))
    assert len(bases) == 1 and (bases[0] / "model.safetensors").is_file()
    assert "pretraining" in proc.stderr

    # a second run reuses the base and never overwrites the first run folder
    again = subprocess.run([sys.executable, "-m", "lora.train_lora", *tiny_flags, "--run_name", "e2e"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "(reused)" in again.stderr and "pretraining" not in again.stderr
    assert (tmp_path / "runs" / "e2e-2" / "metrics.json").is_file()
    assert json.loads((folder / "metrics.json").read_text()) == metrics


def test_help_lists_every_flag_with_its_default():
    proc = subprocess.run([sys.executable, "train_lora.py", "--help"], cwd=ROOT / "lora",
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0
    for name in TrainConfig().to_dict():
        assert f"--{name}" in proc.stdout, name
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "LoRA rank r (default: 8)" in text and "all-linear) (default: q,v)" in text
    assert "projections to adapt: q,k,v,o (attention); gate,up,down" in text
    assert "run folder name (default: <task>-lora-r<r> or <task>-full) --output_dir" in text  # one default


def test_usage_names_the_command_as_it_was_started(tmp_path):
    """``lora-train --help`` says lora-train, ``python lora/train_lora.py --help`` train_lora.py; the console
    script is the wrapper pip writes: a file named lora-train that calls main()."""
    script = tmp_path / "lora-train"
    script.write_text("import sys\nfrom lora.train_lora import main\nsys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command, name in (([str(script)], "lora-train"), (["lora/train_lora.py"], "train_lora.py")):
        shown = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {name} [-h] [--config CONFIG]")
    wrong = subprocess.run([sys.executable, str(script), "--lora_rank", "4"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert wrong.returncode == 2 and wrong.stderr.startswith("lora-train: error: unrecognized arguments")


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 4\nlora_alpha: 8\nlearning_rate: 1e-4\nlora_targets: [q, k]\n")
    cfg = load_config(["--config", str(path), "--lora_alpha", "32"])
    assert cfg.lora_r == 4  # YAML over the default
    assert cfg.lora_alpha == 32.0  # flag over YAML
    assert cfg.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string: still a float
    assert cfg.lora_targets == ["q", "k"]
    assert cfg.batch_size == TrainConfig().batch_size  # untouched default
    assert load_config(["--lora_targets", "q,k,v,o", "--adapt_feedforward"]).lora_targets == [
        "q",
        "k",
        "v",
        "o",
    ]
    assert load_config(["--adapt_feedforward"]).adapt_feedforward is True


def test_unknown_key_and_wrong_type_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: 4\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: unknown key 'lora_rank' in {path}; did you mean 'lora_r'?"
    path.write_text("lora_r: four\n")
    assert main(["--config", str(path)]) == 2
    assert "lora_r must be int, got 'four'" in capsys.readouterr().err


def test_method_full_trains_every_parameter(tiny_flags, tmp_path, capsys):
    assert main([*tiny_flags, "--method", "full", "--run_name", "full"]) == 0
    folder = tmp_path / "runs" / "full"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["method"] == "full" and metrics["trainable_params"] == metrics["total_params"]
    assert metrics["reduction_factor"] == 1.0
    err = capsys.readouterr().err
    assert f"full: training all {metrics['total_params']:,} parameters on cpu\n" in err and "fewer" not in err
    assert (folder / "model" / "model.safetensors").is_file()


def test_lora_run_leaves_the_base_file_untouched(tiny_flags, tmp_path):
    assert main([*tiny_flags, "--run_name", "a"]) == 0
    base = next((tmp_path / "runs" / "bases").glob("[!.]*")) / "model.safetensors"
    before = base.read_bytes(), os.stat(base).st_mtime_ns
    assert main([*tiny_flags, "--run_name", "b", "--max_steps", "3"]) == 0
    assert (base.read_bytes(), os.stat(base).st_mtime_ns) == before


def test_the_configuration_page_lists_every_key():
    page = (ROOT / "docs" / "configuration.md").read_text()
    for name in TrainConfig().to_dict():
        assert f"| `{name}` / `--{name}` |" in page, name


def test_own_text_file_language_modelling(tiny_flags, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    assert main([*task_flags(tiny_flags, "text"), "--train_file", str(text), "--run_name", "t"]) == 0
    folder = tmp_path / "runs" / "t"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metric_name"] == "bits_per_byte" and metrics["higher_is_better"] is False
    assert metrics["final_metric"] < metrics["base_metric"]  # a repetitive text is quickly learned
    assert "--- adapted:" in (folder / "samples.txt").read_text()
    assert (tmp_path / "runs" / "bases").glob("english-*")


def test_own_jsonl_classification(tiny_flags, tmp_path):
    rows = [{"text": f"{'good great fine' if i % 2 else 'bad awful poor'} {i}", "label": ["neg", "pos"][i % 2]}
            for i in range(200)]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    flags = [
        *task_flags(tiny_flags, "jsonl"),
        "--train_file",
        str(data),
        "--run_name",
        "c",
        "--epochs",
        "10",
        "--max_steps",
        "40",
    ]
    assert main(flags) == 0
    folder = tmp_path / "runs" / "c"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metric_name"] == "accuracy" and metrics["final_metric"] >= 0.9
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["num_classes"] == 2 and adapter["labels"] == ["neg", "pos"]
    assert not (folder / "samples.txt").exists()


MAIN_SETTINGS = ("task", "method", "seed", "device", "precision", "num_examples", "seq_len", "base_checkpoint",
                 "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "adapt_feedforward", "epochs", "max_steps",
                 "batch_size", "learning_rate", "weight_decay", "warmup_steps", "lr_schedule", "grad_clip",
                 "eval_every", "eval_batches", "save_every")  # fmt: skip


def test_default_yaml_spells_out_the_main_settings_at_their_defaults():
    """configs/default.yaml is where a user starts a config: each main setting at TrainConfig's default (so
    it cannot drift from the dataclass), each on its own line with a comment."""
    path = ROOT / "configs" / "default.yaml"
    values = load_yaml(path)
    defaults = TrainConfig().to_dict()
    missing = [key for key in MAIN_SETTINGS if key not in values]
    assert not missing, f"default.yaml lacks {missing}"
    for key, value in values.items():
        assert key in defaults, key
        assert resolve_config({key: value}) == TrainConfig(), (
            f"{key}: {value!r} is not the default {defaults[key]!r}"
        )
        assert value == defaults[key], (key, value, defaults[key])
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(values)  # one setting a line
    for line in lines:
        assert re.fullmatch(r"\w+: \S.* +# \S.*", line), f"no comment: {line!r}"


def test_default_yaml_is_the_main_job_and_every_config_loads():
    assert load_config(["--config", str(ROOT / "configs" / "default.yaml")]) == TrainConfig()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        needs_data = yaml.safe_load(path.read_text()).get("task") in ("text", "jsonl")
        cfg = load_config(["--config", str(path), *(["--train_file", "x.txt"] if needs_data else [])])
        assert cfg.method in ("lora", "full"), path


def test_run_from_inside_lora_lands_in_the_top_level_runs(tmp_path):
    """`cd lora && python train_lora.py ...` writes the project's runs/, not lora/runs/ (a copy of the
    project in a temporary folder, so that the real runs/ is left alone)."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "lora", project / "lora", ignore=shutil.ignore_patterns("__pycache__", "runs"))
    proc = subprocess.run([sys.executable, "train_lora.py", *TINY_FLAGS, "--max_steps", "2", "--run_name", "inside"],
                          cwd=project / "lora", capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (project / "runs" / "inside" / "adapter_model.safetensors").is_file()
    assert len(list((project / "runs" / "bases").glob("[!.]*"))) == 1
    assert not (project / "lora" / "runs").exists()
    assert f"run folder: {project / 'runs' / 'inside'}" in proc.stderr


def test_help_names_only_tasks_configs_and_runs_that_exist():
    doc = train_lora_module.__doc__
    assert "reverse" not in doc
    tasks = re.findall(r"--task (\w+)", doc)
    assert tasks and set(tasks) <= set(TASKS)
    configs = re.findall(r"configs/[\w.-]+\.yaml", doc)
    assert configs and all((ROOT / c).is_file() for c in configs)
    assert set(re.findall(r"runs/([\w.-]+)", doc)) == {run_folder_name(TrainConfig()), "bases"}
    assert "(rot13 on a Caesar base)" in doc


IGNORED = {  # the task's tiny flags, the flags under test, what the refusal must say
    "data file, built-in task": ("rot13", ["--train_file", "mine.txt"], "train_file has no effect on task rot13"),
    "seq_len, cipher task": ("rot13", ["--seq_len", "16"], "seq_len has no effect on task rot13: its sequences are 15"),
    "num_examples, text task": ("text", ["--train_file", "t.txt", "--num_examples", "512"],
                                "num_examples has no effect on task text"),
    "LoRA option, full": ("rot13", ["--method", "full", "--lora_alpha", "32"],
                          "lora_alpha has no effect with method full"),
    "val_fraction beside val_file": ("text", ["--train_file", "t.txt", "--val_file", "v.txt", "--val_fraction", "0.2"],
                                     "val_fraction has no effect with --val_file"),
    "base_steps, given base": ("rot13", ["--base_checkpoint", "B"], "base_steps has no effect with --base_checkpoint B"),
}  # fmt: skip


@pytest.mark.parametrize("case", IGNORED, ids=list(IGNORED))
def test_an_option_the_run_would_ignore_is_refused_and_nothing_is_written(case, tiny_flags, tmp_path, capsys):
    task, extra, message = IGNORED[case]
    flags = tiny_flags if task == "rot13" else task_flags(tiny_flags, task)
    assert main([*flags, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "drop it" in err or "use --" in err or "drop one" in err  # says what to do instead
    assert not (tmp_path / "runs").exists()


def test_an_ignored_yaml_key_is_refused_but_a_run_s_own_config_yaml_reruns(tiny_flags, tmp_path, capsys):
    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text("task: rot13\nseq_len: 64\n")
    assert main([*tiny_flags, "--config", str(yaml_path)]) == 2
    assert "seq_len has no effect on task rot13" in capsys.readouterr().err
    # a run folder's config.yaml lists every key (at its default where unused): it reruns as it is
    assert main([*tiny_flags, "--run_name", "first", "--max_steps", "2"]) == 0
    saved = tmp_path / "runs" / "first" / "config.yaml"
    assert main(["--config", str(saved), "--run_name", "second"]) == 0
    assert (tmp_path / "runs" / "second" / "metrics.json").is_file()


def test_a_preset_s_settings_made_moot_on_the_command_line_are_reported_not_refused(base, tmp_path, capsys):
    """configs/code.yaml pretrains its base for 800 steps; with --base_checkpoint on the command line that is
    moot: said in one line, and the run goes on. The same YAML naming a base itself is refused."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("task: rot13\nbase_steps: 40\nbase_learning_rate: 0.003\n")
    flags = [*ON_BASE_FLAGS, "--output_dir", str(tmp_path / "runs"), "--config", str(preset)]
    assert main([*flags, "--base_checkpoint", str(base), "--max_steps", "2"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"warning: {preset} sets {key}, which has no effect with --base_checkpoint {base} "
                        "(nothing is pretrained); ignored" for key in ("base_steps", "base_learning_rate")]  # fmt: skip
    preset.write_text(f"task: rot13\nbase_steps: 40\nbase_checkpoint: {base}\n")
    assert main([*flags, "--max_steps", "2", "--run_name", "again"]) == 2
    assert "base_steps has no effect with --base_checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "again").exists()


def test_a_max_steps_beyond_the_epochs_is_said_with_the_epochs_that_reach_it(base, tmp_path, capsys):
    flags = [*ON_BASE_FLAGS, "--output_dir", str(tmp_path / "runs"), "--base_checkpoint", str(base)]
    assert main([*flags, "--max_steps", "20"]) == 0  # 512 examples, batch 32: 16 steps an epoch
    err = capsys.readouterr().err
    assert "warning: max_steps 20 is more than 1 epoch(s) of 16 steps: training stops at step 16; --epochs 2 " \
           "reaches it" in err  # fmt: skip
    metrics = json.loads(next((tmp_path / "runs").glob("[!.]*/metrics.json")).read_text())
    assert metrics["steps"] == 16


def test_a_default_base_made_with_another_learning_rate_is_refused_not_reused(tiny_flags, tmp_path, capsys):
    assert main([*tiny_flags, "--run_name", "a", "--max_steps", "2"]) == 0
    base = next((tmp_path / "runs" / "bases").glob("[!.]*"))
    assert json.loads((base / "pretraining.json").read_text()) == {"base_learning_rate": 0.002}
    capsys.readouterr()
    assert main([*tiny_flags, "--run_name", "b", "--base_learning_rate", "0.01"]) == 2
    err = capsys.readouterr().err
    assert f"the base {base} was pretrained with base_learning_rate 0.002, not 0.01 as asked" in err
    assert not (tmp_path / "runs" / "b").exists()


def test_resume_refuses_the_options_it_would_ignore(tiny_flags, tmp_path, capsys):
    assert main(["--resume", str(tmp_path / "x"), "--overwrite"]) == 2
    assert "overwrite has no effect with --resume" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "x"), "--run_name", "y"]) == 2
    assert "run_name has no effect with --resume" in capsys.readouterr().err
