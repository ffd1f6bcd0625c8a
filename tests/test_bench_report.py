"""scripts/bench_report.py: the benchmark's report stands on its own (its tables and targets are tested with the
benchmark's records in test_benchmark.py)."""

import subprocess
import sys
from pathlib import Path

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
