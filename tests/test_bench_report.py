"""scripts/bench_report.py: the benchmark's report stands on its own (its tables and targets are tested with the
benchmark's records in test_benchmark.py)."""

import subprocess
import sys
from pathlib import Path

from scripts.bench_report import markdown, summarise

ROOT = Path(__file__).resolve().parents[1]


def test_the_report_imports_neither_the_benchmark_nor_torch():
    """The report is pure over the record it is handed: importing it loads no measuring code (no import cycle
    with scripts/benchmark.py, which imports it) and not torch."""
    code = (
        "import sys; import scripts.bench_report as r; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'benchmark') "
        "or m == 'scripts.benchmark'), callable(r.markdown) and callable(r.plot) and callable(r.summarise))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] True"


def _llama_result(same: bool) -> dict:
    """A report's record of a Llama-layout size with the generation rows, by hand."""
    row = {"status": "ok", "step_ms": 500.0, "tokens_per_s": 128.0, "peak_mem_mb": 900.0, "trainable_params": 0,
           "mfu": None, "step_ms_rounds": [500.0, 400.0], "generated": [5, 6, 7, 8]}  # fmt: skip
    hf = {**row, "step_ms": 600.0, "tokens_per_s": 106.7, "step_ms_rounds": [600.0, 600.0],
          "generated": [5, 6, 7, 8] if same else [5, 6, 7, 9]}  # fmt: skip
    rows = {"generate": row, "hf_generate": hf}
    shape = {"d_model": 576, "num_layers": 30, "num_heads": 9, "seq_len": 128, "batch": 4, "vocab_size": 49152,
             "base": None, "family": "llama", "num_kv_heads": 3, "d_ff": 1536}  # fmt: skip
    return {
        "machine": {"gpu": None, "cpu": "x", "cpu_count": 2, "torch": "t", "transformers": "5", "peft": "p",
                    "load_average_start": [1.0], "load_average_end": [2.0]},
        "settings": {"device": "cpu", "dtype": "fp32", "compile": False, "steps": 3, "warmup": 1, "rounds": 2,
                     "threads_used": 2},
        "shapes": {"smollm2": shape}, "results": {"smollm2": rows},
        "summary": {"smollm2": summarise(rows)},
    }  # fmt: skip


def test_a_llama_size_s_heading_and_generation_line():
    """The Llama layout is named in its size's heading (random weights said so), and greedy generation gets a
    line: each side's tokens/s, ours over transformers' within rounds (600 / 500 and 600 / 400: median 1.35),
    and whether the tokens were the same."""
    result = _llama_result(same=True)
    summary = result["summary"]["smollm2"]
    assert summary["generate_tokens_vs_hf_rounds"] == [1.2, 1.5] and summary["generate_tokens_vs_hf"] == 1.35
    assert summary["generate_same_tokens"] is True
    md = markdown(result)
    assert ("## smollm2: d_model 576, 30 layers, 9 heads, vocab 49152, batch 4 x seq 128 (Llama layout: RMSNorm, "
            "rotary, gated SiLU MLP 1,536, 3 key/value heads, tied head; random weights)") in md  # fmt: skip
    assert ("Greedy generation with the key/value cache, 4 new tokens of one sequence: ours (`model.generate`) "
            "128.0 tokens/s, transformers' `generate(do_sample=False)` 106.7 tokens/s; ours over transformers' "
            "(within rounds): 1.350 (rounds 1.200-1.500); the same tokens: yes.") in md  # fmt: skip
    assert "here they are a guide" not in md  # (the CPU targets are set for this size)
    paired = {"generate": {"ms_passes": [500.0, 300.0]}, "hf_generate": {"ms_passes": [550.0, 600.0]}}
    result["summary"]["smollm2"] = summarise(result["results"]["smollm2"], paired)  # (--paired: 1.1 and 2.0)
    assert ("(within rounds): 1.350 (rounds 1.200-1.500), side by side 1.550 (passes 1.100-2.000); the same "
            "tokens: yes.") in markdown(result)  # fmt: skip
    assert summarise(_llama_result(same=False)["results"]["smollm2"])["generate_same_tokens"] is False
    assert "the same tokens: no." in markdown(_llama_result(same=False))
