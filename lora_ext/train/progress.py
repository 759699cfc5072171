"""Subscribers to the training loop's events: a tqdm bar for the CLI, TensorBoard event files when the
tensorboard package is installed. The loop knows none of them."""
from __future__ import annotations

import sys


class TqdmProgress:
    def __init__(self):
        self.bar = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if event.kind == "message":
            tqdm.write(event.text, file=sys.stderr)       # stdout is the CLI's JSON answer
        elif event.kind == "step":
            if self.bar is None:
                self.bar = tqdm(total=event.total, initial=event.step - 1, desc="training", unit="step")
            # while latents are cached at first need, the steps that encode one are slower: the bar says so
            caching = {"latents": f"{event.latents[0]}/{event.latents[1]}"} if event.latents else {}
            self.bar.set_postfix(loss=f"{event.avg_loss:.4f}", lr=f"{event.lr:.2e}", epoch=event.epoch, **caching,
                                 refresh=False)
            self.bar.update(1)
            # each step shown when it ends: tqdm skips a redraw within 0.1 s of the last, and the bar is made
            # at the first step's end, so step 1 was never shown
            self.bar.refresh()
        elif event.kind in ("save", "sample"):
            tqdm.write(f"{event.kind}: {', '.join(event.paths)}", file=sys.stderr)
        elif event.kind in ("done", "cancelled") and self.bar is not None:
            self.bar.close()


class TensorBoardLog:
    """Writes loss and lr per step under `folder`, if tensorboard is installed; else stays silent."""

    def __init__(self, folder: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(folder)
        except Exception:
            self.writer = None

    def __call__(self, event) -> None:
        if self.writer is None:
            return
        if event.kind == "step":
            self.writer.add_scalar("loss/current", event.loss, event.step)
            self.writer.add_scalar("loss/average", event.avg_loss, event.step)
            self.writer.add_scalar("lr", event.lr, event.step)
        elif event.kind in ("done", "cancelled"):
            self.writer.close()


def fan_out(*subscribers):
    def emit(event):
        for s in subscribers:
            s(event)
    return emit
