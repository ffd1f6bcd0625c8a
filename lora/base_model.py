"""The default base model: pretrained here once per recipe (full training of every weight), then reused.

``--base_checkpoint auto`` names the base by its recipe, ``<output root>/bases/<base task>-d<d>-h<h>-l<l>
-s<max_seq_len>-steps<n>-seed<seed>`` (the base task is caesar for the ciphers, english for text); the first
run that needs it pretrains it and writes the folder atomically, with the recipe in ``pretraining.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from lora.config import TrainConfig
from lora.data import VOCAB_SIZE, BatchLoader, base_task_of, load_task
from lora.errors import ConfigError, Interrupted
from lora.files import atomic_folder, atomic_write_json, file_lock, read_json
from lora.formats import CONFIG_NAME, WEIGHTS_NAME
from lora.lora_transformer import LoRATransformer
from lora.run_folder import output_root
from lora.trainer import Trainer

__all__ = [
    "RECIPE_NAME",
    "base_dir_for",
    "check_recipe",
    "default_base_exists",
    "ensure_base",
    "pretrain_base",
    "require_folder",
]

RECIPE_NAME = "pretraining.json"


def base_dir_for(cfg: TrainConfig) -> Path:
    """The base checkpoint folder: ``cfg.base_checkpoint``, or for ``auto`` a name from its recipe."""
    if cfg.base_checkpoint != "auto":
        return Path(cfg.base_checkpoint)
    name = (f"{base_task_of(cfg.task)}-d{cfg.d_model}-h{cfg.num_heads}-l{cfg.num_layers}-s{cfg.max_seq_len}"
            f"-steps{cfg.base_steps}-seed{cfg.seed}")  # fmt: skip
    return output_root(cfg.output_dir) / "bases" / name


def pretrain_base(cfg: TrainConfig, device: torch.device, say: Callable[[str], None]) -> LoRATransformer:
    """Pretrain a LoRA-free model of ``cfg``'s architecture on the task's base task (every weight trains)."""
    base_task = load_task(cfg, base_task_of(cfg.task))
    say(f"No base model yet: pretraining one on '{base_task.name}' ({base_task.description}), "
        f"{cfg.base_steps} steps, once; it is saved to {base_dir_for(cfg)} and reused by later runs.")  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = LoRATransformer.from_config(cfg.model_config(VOCAB_SIZE))
    trainer = Trainer(
        model, BatchLoader(base_task.train, cfg.batch_size, seed=cfg.seed),
        BatchLoader(base_task.val, cfg.batch_size, shuffle=False), cfg, learning_rate=cfg.base_learning_rate,
        epochs=10**6, max_steps=cfg.base_steps, warmup_steps=min(100, cfg.base_steps // 10), grad_clip=1.0,
        weight_decay=0.01, eval_every=max(cfg.base_steps // 5, 1), lr_schedule="cosine", save_every=0,
        device=str(device), metric_name=base_task.metric_name, label=f"pretraining base ({base_task.name})",
        lora_plus_ratio=1.0,  # the fine-tune's LoRA+ is for its adapter's B; the base has none
        grad_accum_steps=1, early_stopping_patience=0,  # the fine-tune's: one base for any of them
        log_to="none",  # the fine-tune's tracking (its run folder); the base has no run folder
    )  # fmt: skip
    try:
        trainer.train()
    except Interrupted:
        say("interrupted while pretraining the base model; nothing of it was saved")
        raise
    result = trainer.evaluate(max_batches=0)
    say(f"base model on '{base_task.name}': {base_task.metric_name} {result['metric']:.4f}")
    return model.cpu()


def _recipe(cfg: TrainConfig) -> dict:
    """What made a base beyond its folder name: the settings only pretraining reads."""
    return {"base_learning_rate": cfg.base_learning_rate}


def ensure_base(cfg: TrainConfig, device: torch.device, say: Callable[[str], None]) -> Path:
    """Return the base folder, pretraining (once) when the default base is missing (a given base folder must
    exist; what it holds is checked where it is read).

    A default base made with another ``base_learning_rate`` than asked for is refused, not reused. Runs
    that need the same missing base at the same time pretrain it once: the others wait and reuse it.
    """
    folder = base_dir_for(cfg)
    if cfg.base_checkpoint != "auto":  # a given base: what it holds is lora/pretrained.py's to check
        say(f"base model: {require_folder(folder)} (reused)")
        return folder
    exists = lambda: default_base_exists(folder)  # noqa: E731
    if not exists():
        try:  # an output_dir that cannot be written fails now, not after pretraining
            folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the folder {folder.parent}: {e.strerror}") from None
        # Runs that need this base at the same time: one pretrains it, the others wait and reuse it.
        wait = lambda: say(f"waiting for another run that is pretraining {folder} ...")  # noqa: E731
        with file_lock(folder.parent / f".{folder.name}.lock", on_wait=wait):
            if not exists():
                model = pretrain_base(cfg, device, say)
                with atomic_folder(folder) as tmp:
                    model.save_pretrained(tmp)
                    atomic_write_json(tmp / RECIPE_NAME, _recipe(cfg))
                return folder
    check_recipe(cfg, folder)
    say(f"base model: {folder} (reused)")
    return folder


def default_base_exists(folder: Path) -> bool:
    """Whether the default base folder holds a model (written whole, or not at all)."""
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def require_folder(folder: Path) -> Path:
    """A given base folder, which must exist (a missing one: one line)."""
    if not folder.is_dir():
        raise ConfigError(f"base checkpoint not found: {folder} (expected a model folder: {CONFIG_NAME} and its "
                          "weights)")  # fmt: skip
    return folder


def check_recipe(cfg: TrainConfig, folder: Path) -> None:
    """Refuse a default base pretrained with other settings than the ones asked for now."""
    recipe = folder / RECIPE_NAME
    if not recipe.is_file():  # made before recipes were recorded
        return
    made = read_json(recipe)
    for key, now in _recipe(cfg).items():
        if made.get(key) != now:
            raise ConfigError(f"the base {folder} was pretrained with {key} {made.get(key)}, not {now} as asked: "
                              f"set --{key} {made.get(key)} to reuse it, or delete that folder to pretrain it again")  # fmt: skip
