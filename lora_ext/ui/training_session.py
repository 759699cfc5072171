"""A training run in the background for the UI: started from a config, cancelled by a button, read by a
poll. `run(cfg, on_event, should_stop)` does the work (the webui's job, or the standalone trainer);
`on_written('lora', path)` is told of each LoRA file saved (the webui refreshes its network lists)."""
from __future__ import annotations

import threading
import time

from .jobs import console_traceback


class TrainingSession:
    def __init__(self, run, on_written=None):
        self.run = run
        self.on_written = on_written
        self._lock = threading.Lock()
        # the loaded model, held from a Train click's memory estimate to the end of its run (and by a Check's
        # estimate): two clicks at one moment cannot both measure or train on it
        self._model = threading.Lock()
        self._thread = None
        self._stop = False
        self._cancelled_at = 0.0
        self.events, self.losses, self.samples = [], [], []
        self.result, self.error, self.started = None, None, None
        self.plotted = None         # how many losses the progress plot last showed (see train_tab.progress)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def reserve(self) -> bool:
        """Takes the model for a Train click (its estimate, then its run) unless it is taken; the run gives it
        back when it ends, release() where no run starts."""
        return self._model.acquire(blocking=False)

    def release(self) -> None:
        self._model.release()

    def start(self, cfg, task_id: str | None = None, requested_at: float | None = None, reserved: bool = False) -> bool:
        """False if a run is already going (or the model is taken). `task_id` (the host's progress-bar task)
        goes to `run` when given. `requested_at`: when Train was clicked; a Cancel clicked after it (while the
        dataset was still being checked) stops the run at its first step instead of being forgotten.
        `reserved`: the caller holds the model (reserve()); the run takes it over."""
        with self._lock:
            if not reserved and not self.reserve():
                return False
            self._stop = requested_at is not None and self._cancelled_at >= requested_at
            self.events, self.losses, self.samples = [], [], []
            self.result, self.error, self.started = None, None, time.time()
            self.plotted = None
            self._thread = threading.Thread(target=self._work, args=(cfg, task_id), daemon=True)
            self._thread.start()
            return True

    def _work(self, cfg, task_id) -> None:
        try:
            extra = {"task_id": task_id} if task_id else {}
            self.result = self.run(cfg, self._on_event, lambda: self._stop, **extra)
        except Exception as e:          # shown in the UI as a message, never a traceback
            self.error = f"{type(e).__name__}: {e}"
            console_traceback(e)
        finally:
            self.release()

    def _on_event(self, event) -> None:
        self.events.append(event)
        if event.kind == "step":
            self.losses.append(event.loss)
        elif event.kind == "sample":
            self.samples.extend(event.paths)
        elif event.kind == "save" and self.on_written is not None:
            for path in event.paths:
                try:
                    self.on_written("lora", path)
                except Exception as e:      # a host list not refreshed is no reason to stop training
                    self.events.append(type(event)("message", text=f"could not refresh the LoRA lists: {e}"))

    def cancel(self) -> None:
        self._cancelled_at = time.time()
        self._stop = True

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> str:
        if self.error:
            return f"**Stopped by an error:** {self.error}"
        last = next((e for e in reversed(self.events) if e.kind == "step"), None)
        if self.result is not None:
            verb = "Cancelled" if self.result.cancelled else "Finished"
            resume = f" Resume from `{self.result.state_path}`." if self.result.state_path else ""
            return f"**{verb}** after {self.result.steps} steps: `{self.result.lora_path}`.{resume}"
        if last is None:
            return "Starting (reading the dataset, preparing the model)..." if self.running else "Idle."
        eta = f", about {last.eta_s:.0f} s left" if last.eta_s else ""
        rate = f", {last.it_s:.2f} it/s" if last.it_s else ""
        caching = (f"; latents cached for {last.latents[0]} of {last.latents[1]} images (a step that encodes "
                   "one is slower)" if last.latents else "")
        return (f"Step {last.step}/{last.total} (epoch {last.epoch}): loss {last.loss:.4f}, average "
                f"{last.avg_loss:.4f}, lr {last.lr:.2e}{rate}{eta}{caching}")
