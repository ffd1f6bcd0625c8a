"""Train a LoRA adapter (or fine-tune fully) from the command line: the main job.

    python lora/train_lora.py                              # the default task (rot13 on a Caesar base)
    python lora/train_lora.py --lora_r 16 --lora_targets q,k,v,o
    python lora/train_lora.py --config configs/code.yaml --max_steps 200
    python lora/train_lora.py --task text --train_file my.txt
    python lora/train_lora.py --resume runs/rot13-lora-r8   # continue an interrupted run exactly
    python lora/train_lora.py --log_to tensorboard          # follow it live: tensorboard --logdir runs
    torchrun --nproc_per_node 2 lora/train_lora.py --batch_size 32   # data parallel: global batch 2 x 32
    cd lora && python train_lora.py --lora_r 16            # the same, from inside lora/ (runs go to ../runs)
    lora-train --lora_r 16                                 # the same, as the installed console script

The first run pretrains the task's base model (full training, once) under ``runs/bases/``; every later run
reuses it. Each run writes ``runs/<run_name>/``: config.yaml, history.json, history.csv, metrics.json,
training_curves.png, the adapter, samples.txt (language models) and checkpoints if asked for.
Every option given either takes effect or is refused: an option the run would ignore is an error.

In Python, ``LoRATrainer`` (from here or ``lora.trainer``) trains any model with LoRA adapters.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python lora/train_lora.py` or `cd lora && python train_lora.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

from lora.application import run
from lora.config import load_config
from lora.data import BatchLoader
from lora.distributed import PeerFailedError, from_environment, peer_failure
from lora.errors import Interrupted, guarded
from lora.trainer import LoRATrainer, Trainer, evaluate_model, get_lr

__all__ = [
    "BatchLoader",
    "LoRATrainer",
    "Trainer",
    "evaluate_model",
    "get_lr",
    "main",
    "resume_command",
    "run",
]


def resume_command(folder: Path, processes: int = 1) -> str:
    """The shell command that continues the run in ``folder`` (run from the current folder), on
    ``processes`` processes of one machine (torchrun) when more than one."""
    script = Path(__file__).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(Path.cwd())
    launcher = f"torchrun --nproc_per_node {processes}" if processes > 1 else "python"
    return f"{launcher} {shlex.quote(str(script))} --resume {shlex.quote(str(folder))}"


def invoked_name(default: str = "train_lora.py") -> str:
    """The name the command was started by, for its usage and error lines: ``lora-train`` (the console
    script) or ``train_lora.py``; ``default`` where it was not started from a file (``python -c``)."""
    path = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return path.name if path is not None and path.is_file() else default


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM before (or after) training: the same clean stop as Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 a write failed, 2 bad input, 3 diverged,
    4 an unexpected error, 130 interrupted). Every error is one line; ``--debug`` shows the traceback."""
    prog = invoked_name() if argv is None else "train_lora.py"
    argv = list(sys.argv[1:] if argv is None else argv)

    place = from_environment()

    def body() -> int:
        try:
            run(load_config(argv, description=__doc__, prog=prog))
            return 0
        except PeerFailedError as e:  # another process failed and said so itself: this one only stops
            return e.exit_code
        except KeyboardInterrupt:
            peer = peer_failure() if place.enabled else None
            if peer is not None:  # torchrun stopping the others after one failed
                return peer.exit_code
            raise
        except Interrupted as e:
            if not place.is_main:  # rank 0 wrote the checkpoint and says how to resume
                return e.exit_code
            if e.checkpoint is None:
                print("interrupted; no checkpoint was written", file=sys.stderr)
            else:
                print(f"interrupted; checkpoint {e.checkpoint}", file=sys.stderr)
                local = int(os.environ.get("LOCAL_WORLD_SIZE", place.world_size))
                nodes = (
                    ""
                    if local == place.world_size
                    else " (on every node, with the same --nnodes and rendezvous)"
                )
                print(f"resume with: {resume_command(e.checkpoint.parent, local)}{nodes}", file=sys.stderr)
            return e.exit_code

    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _terminate}
    previous = {s: signal.signal(s, h) for s, h in handlers.items()} if _main_thread() else {}
    try:
        return guarded("", body, "--debug" in argv)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
