"""Sample previews during training: every sample_every_n_steps steps and sample_every_n_epochs epochs (and
after the last epoch), and with sample_at_first before the first step, on the main process."""
from __future__ import annotations

from . import Feature


class Previews(Feature):
    name = "previews"

    @classmethod
    def wanted(cls, cfg) -> bool:
        from ..leaving import previews
        return previews(cfg)

    def at_start(self, loop):
        if loop.r.cfg.sample_at_first and loop.r.dist.main:
            _draw(loop, loop.step, loop.epoch)

    def after_step(self, loop, step, epoch):
        n = loop.r.cfg.sample_every_n_steps
        if n and step % n == 0 and loop.r.dist.main:
            _draw(loop, step, epoch)

    def after_epoch(self, loop, epoch, last):
        n = loop.r.cfg.sample_every_n_epochs
        if n and ((epoch + 1) % n == 0 or last) and loop.r.dist.main:
            _draw(loop, loop.step, epoch)


def _draw(loop, step, epoch):
    from ..saving import samples
    samples(loop.r, step, epoch)
