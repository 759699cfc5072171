"""Numbered saves during training: NAME-step000400 every save_every_n_steps steps and NAME-000003 every
save_every_n_epochs epochs (or about save_n_epoch_ratio of them in the run), with save_state a state beside
each, none at the end: the final save is the run's own. kohya's save_last_n_epochs / save_last_n_steps remove
the older numbered saves as kohya does: at each save, the one of epoch (this one - every x N), or of the step
N steps back cut down to a multiple of every."""
from __future__ import annotations

import os

from . import Feature


def every_n_epochs(cfg, epochs: int) -> int:
    """kohya: save_n_epoch_ratio N gives a save every floor(epochs / N) epochs (at least 1)."""
    if cfg.save_n_epoch_ratio:
        return max(1, epochs // cfg.save_n_epoch_ratio)
    return cfg.save_every_n_epochs


class Snapshots(Feature):
    name = "snapshots"

    @classmethod
    def wanted(cls, cfg) -> bool:
        return bool(cfg.save_every_n_steps or cfg.save_every_n_epochs or cfg.save_n_epoch_ratio)

    def after_step(self, loop, step, epoch):
        cfg = loop.r.cfg
        n = cfg.save_every_n_steps
        if n and step % n == 0 and step < loop.r.total:
            loop.snapshot(f"step{step:06d}")
            if cfg.save_last_n_steps:
                old = step - cfg.save_last_n_steps - 1
                old -= old % n
                if old > 0:
                    _remove(loop, f"step{old:06d}")

    def after_epoch(self, loop, epoch, last):
        cfg = loop.r.cfg
        n = every_n_epochs(cfg, loop.r.epochs)
        if n and (epoch + 1) % n == 0 and not last:
            loop.snapshot(f"{epoch + 1:06d}")
            old = epoch + 1 - n * cfg.save_last_n_epochs
            if cfg.save_last_n_epochs and old > 0:
                _remove(loop, f"{old:06d}")


def _remove(loop, suffix: str) -> None:
    """A numbered save of this run's name that the kept ones have replaced (if it is there)."""
    path = loop.numbered(suffix)
    if loop.r.dist.main and os.path.isfile(path):
        os.remove(path)
