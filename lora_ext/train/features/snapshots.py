"""Numbered saves during training: NAME-step000400 every save_every_n_steps steps and NAME-000003 every
save_every_n_epochs epochs (with save_state, a state beside each), none at the end: the final save is the
run's own."""
from __future__ import annotations

from . import Feature


class Snapshots(Feature):
    name = "snapshots"

    @classmethod
    def wanted(cls, cfg) -> bool:
        return bool(cfg.save_every_n_steps or cfg.save_every_n_epochs)

    def after_step(self, loop, step, epoch):
        n = loop.r.cfg.save_every_n_steps
        if n and step % n == 0 and step < loop.r.total:
            loop.snapshot(f"step{step:06d}")

    def after_epoch(self, loop, epoch, last):
        n = loop.r.cfg.save_every_n_epochs
        if n and (epoch + 1) % n == 0 and not last:
            loop.snapshot(f"{epoch + 1:06d}")
