"""Lightning callbacks for multi-task training."""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class BestValidation(Callback):
    """Keep the weights of the validation check with the lowest validation loss and stop early.

    The score of a check is the sum of the module's task losses ``val/<task>/loss`` (every task of
    ``pl_module.tasks``). After ``patience`` checks without an improvement of ``min_delta`` training
    stops; at the end of ``fit`` the module holds the best weights (kept in memory, no checkpoint files).
    ``best_score``, ``best_check`` (0-based index of the validation check) and ``best_epoch`` say which.
    One instance may serve several fits: it resets at every ``fit`` start.

    Model selection on the validation split only: the test split is never looked at.

    Example:
        >>> import lightning as L
        >>> best = BestValidation(patience=3)
        >>> trainer = L.Trainer(max_epochs=20, callbacks=[best], logger=False, enable_progress_bar=False)
    """

    def __init__(self, patience: int = 6, min_delta: float = 1e-4) -> None:
        if patience < 1:
            raise ValueError(f"BestValidation: patience must be >= 1, got {patience}.")
        self.patience = patience
        self.min_delta = min_delta
        self._reset()

    def _reset(self) -> None:
        self.best_score = math.inf
        self.best_check = -1
        self.best_epoch = -1
        self.checks = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.wait = 0

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        tasks = list(getattr(pl_module, "tasks", {}))
        missing = [f"val/{n}/loss" for n in tasks if f"val/{n}/loss" not in trainer.callback_metrics]
        if not tasks or missing:
            raise KeyError(
                f"BestValidation: the validation loss of every task is needed; missing {missing or 'tasks'} "
                f"(logged: {sorted(trainer.callback_metrics)})."
            )
        score = sum(float(trainer.callback_metrics[f"val/{n}/loss"]) for n in tasks)
        if score < self.best_score - self.min_delta:
            self.best_score, self.wait = score, 0
            self.best_check, self.best_epoch = self.checks, trainer.current_epoch
            self.best_state = copy.deepcopy(pl_module.state_dict())
        else:
            self.wait += 1
            trainer.should_stop = trainer.should_stop or self.wait >= self.patience
        self.checks += 1

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)
