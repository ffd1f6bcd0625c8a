"""Early stopping on the validation loss, with the best weights kept while training goes on.

After each evaluation :meth:`EarlyStopping.observe` takes the step, the validation loss and the trainable
weights. A loss strictly lower than every earlier one makes that step the best and copies the weights (to
the CPU: an adapter is a few MB; under full fine-tuning it is the whole model); any other loss (a NaN too)
is one more evaluation without improvement, and after ``patience`` of them in a row :attr:`should_stop`
is true. A resumed run replays its history's validation losses (:meth:`replay`) and takes the best weights
from its checkpoint, so it stops where the uninterrupted run stops and keeps what it keeps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["EarlyStopping"]


@dataclass
class EarlyStopping:
    """The best validation loss so far (``best_loss`` at ``best_step``, its ``weights`` by name) and the
    evaluations since it (``waited``); ``patience`` >= 1 evaluations without improvement stop training."""

    patience: int
    best_step: int | None = None
    best_loss: float = math.inf
    waited: int = 0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {self.patience!r}")

    def observe(self, step: int, val_loss: float, weights: Mapping[str, torch.Tensor] | None = None) -> bool:
        """Record the evaluation after ``step``; returns whether it is the new best (whose ``weights``, when
        given, are copied)."""
        if not val_loss < self.best_loss:  # a NaN is never an improvement
            self.waited += 1
            return False
        self.best_step, self.best_loss, self.waited = step, float(val_loss), 0
        if weights is not None:
            self.weights = {n: w.detach().to("cpu", copy=True) for n, w in weights.items()}
        return True

    @property
    def should_stop(self) -> bool:
        return self.waited >= self.patience

    def replay(self, steps: Iterable[int], val_losses: Iterable[float | None]) -> None:
        """Observe a history's evaluations again (the steps without one have ``None``), weights aside."""
        for step, loss in zip(steps, val_losses, strict=True):
            if loss is not None:
                self.observe(step, loss)

    @contextlib.contextmanager
    def best_loaded(self, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """``params`` (by name) hold the best weights inside the block and their own values again after it."""
        if self.best_step is None or self.weights.keys() != params.keys():
            raise ValueError("no best weights to load: no evaluation has been observed with the weights")
        now = {n: p.detach().clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self.weights[n])
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(now[n])
