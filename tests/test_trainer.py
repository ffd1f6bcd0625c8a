"""lora/trainer.py: the trainer as a library, called the way the seed documents call it.

``LoRATrainer(model=model, train_loader=train_loader, val_loader=val_loader, learning_rate=1e-4)``,
``history = trainer.train(epochs=10)``, ``trainer.plot_training_history()``; any loader of batches
(a standard ``DataLoader`` over tuples or dicts); any model with LoRA layers.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora.config import TrainConfig
from lora.data import IGNORE, BatchLoader, TaskData, load_task
from lora.errors import ConfigError
from lora.lora_layer import inject_lora
from lora.lora_transformer import LoRATransformer
from lora.train_lora import LoRATrainer, Trainer, get_lr

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    """ROT13 words: 256 training rows (4 batches of 64), 512 validation rows."""
    return load_task(TrainConfig(num_examples=256), "rot13")


def tiny_model(seed: int = 0, **kw) -> LoRATransformer:
    torch.manual_seed(seed)
    return LoRATransformer(vocab_size=256, d_model=32, num_heads=2, num_layers=1, max_seq_len=32, dropout=0.0,
                           **{"lora_r": 4, "lora_alpha": 8, **kw})  # fmt: skip


def tuples(data, batch_size: int, shuffle: bool = False) -> DataLoader:
    """A standard DataLoader over (input_ids, labels) tuples."""
    return DataLoader(TensorDataset(data.x.long(), data.y.long()), batch_size=batch_size, shuffle=shuffle)


# ---------------------------------------------------------------------------------------------------------
# The seed's calls


def test_the_seed_calls_train_ten_epochs_and_write_the_picture(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside a run: the picture goes to the working directory
    model = tiny_model()
    train_loader, val_loader = tuples(task.train, 64, shuffle=True), tuples(task.val, 256)
    trainer = LoRATrainer(model=model, train_loader=train_loader, val_loader=val_loader, learning_rate=1e-4)
    history = trainer.train(epochs=10)
    assert len(train_loader) == 4
    assert history["step"] == list(range(1, 41))  # ten epochs of four batches, not one epoch
    assert history["epoch"][-1] == pytest.approx(10.0)
    assert history["val_loss"][-1] is not None and all(math.isfinite(v) for v in history["train_loss"])
    path = trainer.plot_training_history()
    assert path == Path("training_history.png")
    assert (tmp_path / "training_history.png").read_bytes()[:8] == PNG_MAGIC
    assert trainer.plot_training_history(tmp_path / "sub" / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_train_epochs_is_capped_only_by_an_explicit_max_steps(task):
    loader = tuples(task.train, 64)
    trainer = LoRATrainer(tiny_model(), loader, loader, max_steps=6, quiet=True)
    assert trainer.train(epochs=10)["step"] == list(range(1, 7))
    trainer = LoRATrainer(tiny_model(), loader, loader, epochs=3, quiet=True)
    assert trainer.total_steps == 12
    assert trainer.train(epochs=2)["step"] == list(range(1, 9))  # epochs given to train() wins, both ways
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        trainer.train(epochs=0)


def test_in_a_run_the_picture_goes_to_the_run_folder(task, tmp_path):
    loader = tuples(task.train, 64)
    trainer = LoRATrainer(tiny_model(), loader, loader, max_steps=2, run_dir=tmp_path / "run", quiet=True)
    trainer.train()
    assert trainer.plot_training_history() == tmp_path / "run" / "training_curves.png"
    assert (tmp_path / "run" / "training_curves.png").read_bytes()[:8] == PNG_MAGIC


def test_a_dataloader_of_tuples_or_dicts_trains_exactly_as_a_batch_loader(task):
    """The same rows in the same order give bit-for-bit the same losses, whatever the loader."""

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return len(task.train)

        def __getitem__(self, i):
            return {"input_ids": task.train.x[i].long(), "labels": task.train.y[i].long()}

    loaders = {
        "BatchLoader": BatchLoader(task.train, 64, shuffle=False),
        "DataLoader of tuples": tuples(task.train, 64),
        "DataLoader of dicts": DataLoader(Dicts(), batch_size=64),
    }
    val = BatchLoader(task.val, 256, shuffle=False)
    histories = {}
    for name, loader in loaders.items():
        trainer = LoRATrainer(
            tiny_model(), loader, val, learning_rate=1e-2, epochs=2, eval_every=4, quiet=True
        )
        histories[name] = trainer.train()
    reference = histories["BatchLoader"]
    assert len(reference["step"]) == 8
    for name, history in histories.items():
        for key in ("train_loss", "val_loss", "metric", "lr"):
            assert history[key] == reference[key], (name, key)


def test_a_loader_without_a_length_needs_max_steps(task):
    def stream():
        while True:
            yield from tuples(task.train, 64)

    class Endless:
        def __iter__(self):
            return stream()

    with pytest.raises(ValueError, match="no len\\(\\): set max_steps"):
        LoRATrainer(tiny_model(), Endless(), tuples(task.val, 256), quiet=True)
    history = LoRATrainer(tiny_model(), Endless(), tuples(task.val, 256), max_steps=5, quiet=True).train()
    assert history["step"] == [1, 2, 3, 4, 5]


def test_lora_trainer_trains_only_the_adapters_and_leaves_the_base_bit_for_bit(task):
    model = tiny_model()
    model.requires_grad_(True)  # as if the user forgot to freeze: LoRATrainer freezes the base itself
    base = {k: v.clone() for k, v in model.base_state_dict().items()}
    loader = tuples(task.train, 64)
    trainer = LoRATrainer(model, loader, loader, learning_rate=1e-2, max_steps=4, quiet=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if n.endswith(("lora_A", "lora_B"))}
    trainer.train()
    assert all(torch.equal(v, base[k]) for k, v in model.base_state_dict().items())
    assert any(layer.lora_B.abs().sum() > 0 for _, layer in model.lora_layers())
    with pytest.raises(ValueError, match="LoRATrainer needs a model with LoRA adapters"):
        LoRATrainer(tiny_model(lora_r=0), loader, loader)


def test_any_model_with_lora_layers_trains_model_agnostically(task):
    """Not only LoRATransformer: an embedding + linear model with an injected adapter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(256, 32), nn.Linear(32, 256))
    inject_lora(model, ["1"], r=4, lora_alpha=4)
    frozen = model[0].weight.clone()
    loader = tuples(task.train, 64)
    history = LoRATrainer(model, loader, loader, learning_rate=1e-2, epochs=3, quiet=True).train()
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["1.lora_A", "1.lora_B"]
    assert torch.equal(model[0].weight, frozen)
    assert history["train_loss"][-1] < history["train_loss"][0]


def test_trainer_settings_are_train_config_fields_with_its_defaults():
    loader = [(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))]
    trainer = Trainer(tiny_model(lora_r=0).requires_grad_(True), loader, loader, quiet=True)
    defaults = TrainConfig()
    assert (trainer.config.learning_rate, trainer.config.warmup_steps) == (
        defaults.learning_rate,
        defaults.warmup_steps,
    )
    with pytest.raises(
        TypeError, match=r"unexpected trainer setting 'learning_rte'; did you mean 'learning_rate'\?"
    ):
        Trainer(tiny_model(), loader, loader, learning_rte=1e-3)
    with pytest.raises(TypeError, match="unexpected trainer setting 'lr'; the settings are learning_rate, "):
        Trainer(tiny_model(), loader, loader, lr=1e-3)
    with pytest.raises(TypeError, match="unexpected trainer setting 'lora_r'"):
        Trainer(tiny_model(), loader, loader, lora_r=4)
    with pytest.raises(ValueError, match="learning_rate must be > 0, got -1"):
        Trainer(tiny_model(), loader, loader, learning_rate=-1)


# ---------------------------------------------------------------------------------------------------------
# Schedule, loss, evaluation


def test_get_lr_warmup_then_cosine_to_a_tenth():
    assert get_lr(1, 1.0, 10, 100) == pytest.approx(0.1)
    assert get_lr(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert get_lr(55, 1.0, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert get_lr(100, 1.0, 10, 100) == pytest.approx(0.1)
    assert get_lr(50, 1.0, 0, 100, "constant") == 1.0


def _tiny_trainer(method: str = "lora", **kw) -> Trainer:
    cfg = TrainConfig(num_examples=512, batch_size=32)
    task = load_task(cfg, "caesar")
    torch.manual_seed(0)
    model = LoRATransformer(256, d_model=32, num_heads=2, num_layers=1, max_seq_len=32, dropout=0.0,
                            lora_r=0 if method == "full" else 4)  # fmt: skip
    kind = LoRATrainer if method == "lora" else Trainer
    return kind(model, BatchLoader(task.train, 32), BatchLoader(task.val, 32, shuffle=False),
                learning_rate=1e-2, device="cpu", eval_every=10, metric_name="exact_match", quiet=True, **kw)  # fmt: skip


def test_loss_decreases_on_a_tiny_task():
    trainer = _tiny_trainer("full", max_steps=60, warmup_steps=5)
    before = trainer.evaluate()["val_loss"]
    history = trainer.train()
    after = trainer.evaluate()["val_loss"]
    assert after < 0.5 * before
    assert sum(history["train_loss"][-5:]) < sum(history["train_loss"][:5])
    assert all(math.isfinite(v) for v in history["train_loss"])


def test_evaluate_accepts_a_forward_without_truth_value():
    """torch.compile's wrapper raises on len() (so on bool()); evaluate must not test its truth."""

    class Wrapped:
        def __init__(self, model):
            self.model = model

        def __call__(self, *args, **kwargs):
            return self.model(*args, **kwargs)

        def __len__(self):
            raise TypeError("no len()")

    trainer = _tiny_trainer("lora", max_steps=1)
    trainer.forward = Wrapped(trainer.model)
    assert 0.0 <= trainer.evaluate()["metric"] <= 1.0


def test_a_finite_loader_without_a_length_is_passed_over_until_max_steps(task):
    batches = list(tuples(task.train, 64))

    class NoLength:
        def __iter__(self):
            return iter(batches)

    history = LoRATrainer(tiny_model(), NoLength(), batches, max_steps=10, eval_every=100, quiet=True).train()
    assert history["step"] == list(range(1, 11))  # 4 batches a pass: two and a half passes
    assert history["val_loss"][-1] is not None  # the last step is evaluated


def test_devices_with_an_index_are_accepted(task):
    loader = tuples(task.train, 64)
    trainer = LoRATrainer(
        tiny_model(), loader, loader, device=torch.device("cpu", 0), max_steps=1, quiet=True
    )
    assert trainer.device == torch.device("cpu")
    assert TrainConfig(device="cuda:1").validate().device == "cuda:1"
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda, cuda:<index> or mps, got 'gpu'"):
        TrainConfig(device="gpu").validate()


# ---------------------------------------------------------------------------------------------------------
# No host-device synchronisation inside a step


def test_steps_read_the_device_only_every_log_every_steps(task, monkeypatch):
    """Between reads, a step asks the device nothing: no .item(), no truth value, no float(); the losses
    of log_every steps come back in one .tolist() (on a GPU: no sync, checked there in the benchmark)."""
    model = tiny_model()
    trainer = LoRATrainer(model, BatchLoader(task.train, 16, seed=0), BatchLoader(task.val, 64, shuffle=False),
                          device="cpu", max_steps=10, eval_every=1000, log_every=5, quiet=True)  # fmt: skip
    monkeypatch.setattr(trainer, "evaluate", lambda max_batches=None: {"val_loss": 0.0, "metric": 0.0})
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    history = trainer.train()
    monkeypatch.undo()
    assert reads == ["tolist", "tolist"]  # steps 5 and 10
    assert history["step"] == list(range(1, 11)) and all(math.isfinite(v) for v in history["train_loss"])


def test_a_non_finite_step_is_skipped_on_the_device_and_reported_with_its_step(task, monkeypatch):
    import lora.trainer as trainer_module
    from lora.errors import DivergenceError

    original, calls = trainer_module.batch_loss, [0]

    def nan_at_step_3(*args, **kwargs):
        calls[0] += 1
        loss, n, logits = original(*args, **kwargs)
        return (loss * float("nan") if calls[0] == 3 else loss), n, logits

    monkeypatch.setattr(trainer_module, "batch_loss", nan_at_step_3)
    model = tiny_model()
    trainer = LoRATrainer(model, BatchLoader(task.train, 16, seed=0), BatchLoader(task.val, 64, shuffle=False),
                          device="cpu", max_steps=10, eval_every=1000, log_every=5, quiet=True)  # fmt: skip
    with pytest.raises(DivergenceError, match="loss is nan at step 3"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad update never happened
    assert int(trainer.optimizer.state[trainer.params[0]]["step"]) == 4  # steps 1, 2, 4 and 5 updated


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_takes_its_mode_and_compiles_the_whole_forward(task, monkeypatch, mode):
    """--compile_mode reaches torch.compile (reduce-overhead: CUDA graphs on a GPU) around the model's whole
    forward, the chunked loss included; without --compile the mode is refused as an option with no effect."""
    import lora.trainer

    seen = []
    monkeypatch.setattr(lora.trainer.torch, "compile", lambda fn, **kw: seen.append((fn, kw)) or fn)
    model = tiny_model()
    loader = BatchLoader(task.train, 8)
    LoRATrainer(model, loader, loader, compile=True, compile_mode=mode, quiet=True)
    assert seen == [(model, {"mode": mode})]
    with pytest.raises(ConfigError, match="compile_mode has no effect without --compile"):
        TrainConfig(compile_mode=mode).validate(given={"compile_mode"})
    with pytest.raises(
        ConfigError, match="compile_mode must be one of default, reduce-overhead, max-autotune"
    ):
        TrainConfig(compile=True, compile_mode="cuda-graphs").validate()


class OutputReusingForward:
    """A forward whose outputs live in memory its next call writes over, as a model compiled with CUDA graphs
    (``--compile_mode reduce-overhead``) replays into the same buffers: here the previous call's output is
    set to NaN when the next call begins."""

    def __init__(self, forward):
        self.forward, self.previous = forward, None

    def __call__(self, *args, **kwargs):
        if self.previous is not None:
            self.previous.detach().fill_(float("nan"))
        self.previous = self.forward(*args, **kwargs)
        return self.previous


def test_losses_read_steps_later_survive_a_forward_that_reuses_its_output_memory(task, monkeypatch):
    """The pending losses are read every log_every steps; under CUDA graphs the forward's output memory is the
    next step's, so the trainer keeps a copy: the history equals an eager run's, and no step reads as NaN."""
    import lora.trainer

    def run(compile: bool) -> list[float]:
        trainer = LoRATrainer(tiny_model(), BatchLoader(task.train, 16, seed=0), BatchLoader(task.val, 64),
                              device="cpu", max_steps=8, eval_every=1000, log_every=4, quiet=True,
                              compile=compile, compile_mode="reduce-overhead")  # fmt: skip
        trainer.evaluate = lambda max_batches=None: {"val_loss": 0.0, "metric": 0.0}
        return trainer.train()["train_loss"]

    eager = run(compile=False)
    monkeypatch.setattr(lora.trainer.torch, "compile", lambda fn, **kw: OutputReusingForward(fn))
    assert run(compile=True) == eager and all(math.isfinite(v) for v in eager)


def test_a_loss_only_metric_is_evaluated_without_the_whole_logits():
    """bits_per_token of a language model comes from its chunked loss: the value of the plain cross-entropy
    over the scored tokens within float rounding, and an evaluation batch never holds its (B, T, V) logits."""
    import torch.nn.functional as F

    from lora.memory import tensor_peak
    from lora.trainer import evaluate_model

    torch.manual_seed(0)
    V, B, T = 2000, 8, 32
    model = LoRATransformer(vocab_size=V, d_model=32, num_heads=2, num_layers=1, max_seq_len=T, dropout=0.0)
    model.loss_chunk_tokens = 32  # one sequence's logits at a time
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (2 * B, T), generator=g)
    y = torch.roll(x, -1, dims=1)
    y[:, -3:] = -100  # not scored
    batches = [(x[:B], y[:B]), (x[B:], y[B:])]
    got = evaluate_model(model, batches, "bits_per_token")
    with torch.no_grad():
        logits = model(x).reshape(-1, V)
    want = F.cross_entropy(logits, y.reshape(-1), ignore_index=-100).item()
    assert got["val_loss"] == pytest.approx(want, rel=1e-6) and got["metric"] == pytest.approx(
        want / math.log(2)
    )
    _, chunked = tensor_peak(lambda: evaluate_model(model, batches, "bits_per_token"))
    _, whole = tensor_peak(lambda: evaluate_model(model, batches, "accuracy"))  # needs the logits' argmax
    assert chunked < B * T * V * 4 / 4 < whole  # a quarter of one batch's logits, against all of them


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation: N micro-batches of B make the update of one batch of N x B


def trained(
    model: LoRATransformer, loader, val, **settings
) -> tuple[dict[str, list], dict[str, torch.Tensor]]:
    trainer = LoRATrainer(model, loader, val, device="cpu", quiet=True, **settings)
    history = trainer.train()
    return history, {n: p.detach().clone() for n, p in trainer.trainable_weights().items()}


def assert_same_training(got, want) -> None:
    """The same steps, epochs and learning rates; losses and weights within 1e-6 (scaled)."""
    (history, weights), (want_history, want_weights) = got, want
    for key in ("step", "epoch", "lr"):
        assert history[key] == want_history[key], key
    assert_close_scaled(torch.tensor(history["train_loss"]), torch.tensor(want_history["train_loss"]), 1e-6)
    assert weights.keys() == want_weights.keys()
    for name in weights:
        assert_close_scaled(weights[name], want_weights[name], 1e-6, msg=name)


@pytest.mark.parametrize(("batch", "accum"), [(4, 4), (4, 3)])
def test_accumulated_micro_batches_train_the_adapter_of_one_big_batch(task, batch, accum):
    """batch 4 x 4 micro-batches = batch 16, over two epochs (256 rows: 16 updates each). With 3 micro-batches
    an epoch has 64 // 3 = 21 updates and its last micro-batch is left out, as batch 12 leaves out 4 rows."""
    val = BatchLoader(task.val, 64, shuffle=False)
    settings = {"max_steps": 30, "epochs": 2, "eval_every": 10, "eval_batches": 2, "learning_rate": 1e-2}
    big = trained(tiny_model(), BatchLoader(task.train, batch * accum, seed=1), val, **settings)
    small = trained(
        tiny_model(), BatchLoader(task.train, batch, seed=1), val, grad_accum_steps=accum, **settings
    )
    assert small[0]["step"] == list(range(1, 31)) and small[0]["epoch"][-1] > 1  # into the second epoch
    assert_same_training(small, big)
    assert_close_scaled(torch.tensor([v for v in small[0]["val_loss"] if v is not None]),
                        torch.tensor([v for v in big[0]["val_loss"] if v is not None]), 1e-6)  # fmt: skip


def masked_rows(n: int = 64, width: int = 15, seed: int = 0) -> TaskData:
    """Rows scored unevenly (each a share of its tokens, from none to all), as padded or answers-only rows
    are; rows 0-3 (the first micro-batch of 4) are not scored at all."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(97, 123, (n, width), generator=g)
    y = torch.roll(x, -1, dims=1)
    y[torch.rand(n, width, generator=g) > torch.rand(n, 1, generator=g)] = IGNORE
    y[:4] = IGNORE
    return TaskData(x, y)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked loss", "whole logits"])
def test_the_accumulated_loss_is_the_mean_over_every_scored_token_not_a_mean_of_means(chunked, monkeypatch):
    data = masked_rows()
    val = BatchLoader(data, 64, shuffle=False)
    if not chunked:  # the loss from the logits (as for a model without a chunked loss)
        monkeypatch.setattr("lora.trainer.has_chunked_loss", lambda model: False)
    settings = {"max_steps": 4, "eval_every": 100, "learning_rate": 1e-2, "warmup_steps": 0}
    big = trained(tiny_model(), BatchLoader(data, 16, shuffle=False), val, **settings)
    small = trained(tiny_model(), BatchLoader(data, 4, shuffle=False), val, grad_accum_steps=4, **settings)
    assert_same_training(small, big)
    # the first update's loss by hand: Σ token losses / Σ scored tokens of its 16 rows
    model = tiny_model()
    with torch.no_grad():
        losses = [F.cross_entropy(model(data.x[i : i + 4]).flatten(0, 1), data.y[i : i + 4].flatten(),
                                  ignore_index=IGNORE, reduction="none") for i in range(0, 16, 4)]  # fmt: skip
    counts = [int((data.y[i : i + 4] != IGNORE).sum()) for i in range(0, 16, 4)]
    mean = (sum(loss.sum() for loss in losses) / sum(counts)).item()
    assert counts[0] == 0 and min(counts[1:]) > 0 and len(set(counts[1:])) == 3  # uneven micro-batches
    assert small[0]["train_loss"][0] == pytest.approx(mean, rel=1e-6)
    mean_of_means = sum(loss.sum().item() / c for loss, c in zip(losses[1:], counts[1:], strict=True)) / 3
    assert abs(mean_of_means - mean) > 1e-3  # what the test tells apart


def test_accumulation_with_a_dataloader_and_its_bad_values(task):
    """Any loader accumulates (a DataLoader of tuples here); too many micro-batches for an epoch, or a
    value below 1, is refused in one line."""
    val = tuples(task.val, 256)
    settings = {"max_steps": 6, "eval_every": 100, "learning_rate": 1e-2}
    assert_same_training(trained(tiny_model(), tuples(task.train, 8), val, grad_accum_steps=4, **settings),
                         trained(tiny_model(), tuples(task.train, 32), val, **settings))  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"^grad_accum_steps 33 is more than the 32 batch\(es\) the training "
    ):
        LoRATrainer(tiny_model(), tuples(task.train, 8), val, grad_accum_steps=33)
    with pytest.raises(ConfigError, match=r"^grad_accum_steps must be >= 1, got 0$"):
        LoRATrainer(tiny_model(), tuples(task.train, 8), val, grad_accum_steps=0)


# ---------------------------------------------------------------------------------------------------------
# Early stopping


def stopping_trainer(task, **settings) -> LoRATrainer:
    """Trained on ROT13 and validated on Atbash: the validation loss falls while the model learns to answer
    with letters, then rises as it learns ROT13's letters (here after step 8)."""
    val = BatchLoader(load_task(TrainConfig(num_examples=256), "atbash").val, 128, shuffle=False)
    return LoRATrainer(tiny_model(), BatchLoader(task.train, 16, seed=0), val, device="cpu", quiet=True,
                       learning_rate=0.1, lr_schedule="constant", warmup_steps=0, epochs=3, eval_every=2,
                       eval_batches=0, early_stopping_patience=2, **settings)  # fmt: skip


def test_early_stopping_stops_after_patience_evaluations_without_improvement_and_keeps_the_best(
    task, tmp_path
):
    from lora.trainer import evaluate_model

    trainer = stopping_trainer(task, run_dir=tmp_path, save_every=1, keep_checkpoints=20)
    history = trainer.train()
    early, val = trainer.early_stopping, trainer.val_loader
    losses = {s: v for s, v in zip(history["step"], history["val_loss"], strict=True) if v is not None}
    assert trainer.stopped_early_at == trainer.step == history["step"][-1] < trainer.total_steps == 48
    best = min(losses, key=losses.get)
    assert (early.best_step, early.best_loss) == (best, losses[best])
    assert [s for s in losses if s > best] == [best + 2, best + 4]  # two evaluations without improvement
    assert trainer.summary() == {"grad_accum_steps": 1, "effective_batch_size": 16, "best_step": best,
                                 "best_val_loss": losses[best], "stopped_early": True,
                                 "stopped_at_step": best + 4}  # fmt: skip
    with early.best_loaded(trainer.trainable_weights()):  # the kept weights give the best loss again
        assert evaluate_model(trainer.model, val, "exact_match")["val_loss"] == pytest.approx(
            losses[best], rel=1e-6
        )
    assert evaluate_model(trainer.model, val, "exact_match")["val_loss"] == pytest.approx(
        losses[best + 4], rel=1e-6
    )

    # resumed between the best step and the stop (its checkpoint keeps the best weights): the same end
    for at in (best + 3, best + 4):
        resumed = stopping_trainer(task)
        resumed.resume_from(tmp_path / f"checkpoint-{at:07d}.safetensors")
        again = resumed.train()
        assert all(
            again[k] == history[k] for k in ("step", "epoch", "train_loss", "val_loss", "metric", "lr")
        )
        assert resumed.stopped_early_at == best + 4 and resumed.early_stopping.best_step == best
        for name, weight in early.weights.items():
            assert torch.equal(resumed.early_stopping.weights[name], weight), name


def test_early_stopping_that_could_never_stop_is_refused(task):
    loader = BatchLoader(task.train, 64)  # 4 steps an epoch
    with pytest.raises(ConfigError, match=r"^early_stopping_patience 2 has no effect: 8 steps with eval_every 4 "
                                          r"evaluate 2 time\(s\)"):  # fmt: skip
        LoRATrainer(tiny_model(), loader, loader, epochs=2, eval_every=4, early_stopping_patience=2)
    with pytest.raises(ConfigError, match=r"^early_stopping_patience has no effect: --max_steps 12 with "
                                          r"--eval_every 50 evaluates 1 time"):  # fmt: skip
        TrainConfig(max_steps=12, early_stopping_patience=1).validate(given={"early_stopping_patience"})
    with pytest.raises(ConfigError, match=r"^early_stopping_patience must be >= 0 \(0: off\), got -1$"):
        TrainConfig(early_stopping_patience=-1).validate()


def test_a_run_with_early_stopping_keeps_the_best_adapter_beside_the_last(base, tmp_path):
    """Trained on one text and validated on another, at a learning rate that makes the validation loss
    rise after step 4: patience 1 stops after step 5; best/ holds step 4's adapter, which gives the
    recorded validation loss again; metrics.json says so."""
    import json

    from conftest import ON_BASE_FLAGS, task_flags

    from lora.train_lora import main
    from lora.trainer import evaluate_model

    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("the cat sat on the mat. " * 300)
    val.write_text("Quick zephyrs blow, vexing daft Jim! 0123456789 " * 40)
    flags = task_flags(
        [*ON_BASE_FLAGS, "--output_dir", str(tmp_path / "runs"), "--base_checkpoint", str(base)], "text"
    )
    assert main([*flags, "--train_file", str(train), "--val_file", str(val), "--learning_rate", "0.1",
                 "--lr_schedule", "constant", "--warmup_steps", "0", "--eval_every", "1",
                 "--early_stopping_patience", "1", "--run_name", "early"]) == 0  # fmt: skip
    folder = tmp_path / "runs" / "early"
    metrics = json.loads((folder / "metrics.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    assert history["step"] == [1, 2, 3, 4, 5] and history["val_loss"][4] > history["val_loss"][3]
    assert min(history["val_loss"]) == history["val_loss"][3]
    assert {k: metrics[k] for k in ("best_step", "best_val_loss", "stopped_early", "stopped_at_step", "steps")} == {
        "best_step": 4, "best_val_loss": history["val_loss"][3], "stopped_early": True, "stopped_at_step": 5,
        "steps": 5}  # fmt: skip
    assert sorted(p.name for p in (folder / "best").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((folder / "best" / "adapter_config.json").read_text())
    assert (config["best_step"], config["best_val_loss"]) == (4, history["val_loss"][3])
    cfg = TrainConfig(task="text", train_file=str(train), val_file=str(val), seq_len=16)
    loader = BatchLoader(load_task(cfg).val, 32, shuffle=False)
    model = LoRATransformer.from_pretrained(base)
    for adapter, step in ((folder / "best", 4), (folder, 5)):  # the best, and the last
        model.load_adapter(adapter)
        got = evaluate_model(model, loader, "bits_per_byte", max_batches=2)["val_loss"]
        assert got == pytest.approx(history["val_loss"][step - 1], rel=1e-6), adapter


def test_the_default_base_is_pretrained_without_the_fine_tune_s_accumulation_or_early_stopping(monkeypatch):
    """A base pretrained here is shared by every fine-tune of its architecture: those settings are not its."""
    import lora.base_model
    import lora.trainer

    seen = []

    def record(model, train, val, config, **settings):
        trainer_settings = {k: v for k, v in settings.items() if k in lora.trainer.TRAINER_SETTINGS}
        seen.append(lora.trainer._trainer_config(config, trainer_settings))
        raise KeyboardInterrupt  # no training needed

    monkeypatch.setattr(lora.base_model, "Trainer", record)
    cfg = TrainConfig(grad_accum_steps=4, early_stopping_patience=3, num_examples=64, batch_size=8, d_model=32,
                      num_heads=2, num_layers=1, max_seq_len=32)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        lora.base_model.pretrain_base(cfg, torch.device("cpu"), lambda message: None)
    assert (seen[0].grad_accum_steps, seen[0].early_stopping_patience, seen[0].batch_size) == (1, 0, 8)
