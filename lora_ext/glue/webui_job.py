"""Running lora_ext's work as a job of the webui: its generation lock, progress state and Interrupt button.
With scripts/ (the registrations), the only place that imports the webui's `modules` package."""
from __future__ import annotations


def train_as_webui_job(cfg, on_event=None, before=None, should_stop=None, task_id=None, host_fn=None):
    """Trains on the webui's loaded model in place, as one of its jobs: behind the lock that serialises
    generation (so the two never overlap), with the webui's progress state (job, step counter, text) and
    its Interrupt button as the cancel. `before(host)` runs first, under the lock (the panel gives its
    merged LoRAs back there, so training starts from the checkpoint's own weights). `task_id`: the id the
    page's progress bar asks the webui's progress API about (queued, then current while the run goes).
    `host_fn()`: the adapter the caller holds for the loaded model (the panel's: the hooks it left are on that
    one), else a new one over `shared.sd_model`."""
    from modules import call_queue, progress, shared

    from ..hosts import for_model
    from ..train.loop import train

    if task_id:
        progress.add_task_to_queue(task_id)
    with call_queue.queue_lock:
        if task_id:
            progress.start_task(task_id)
        host = host_fn() if host_fn is not None else for_model(shared.sd_model)
        if before is not None:
            before(host)
        shared.state.begin(job="lora_ext training")
        shared.state.job_count = 1
        try:
            def relay(event):
                if event.kind == "step":
                    shared.state.sampling_steps = event.total
                    shared.state.sampling_step = event.step
                    shared.state.textinfo = f"LoRA training: step {event.step}/{event.total}, loss {event.avg_loss:.4f}"
                if on_event is not None:
                    on_event(event)
            with host.training_weights():
                return train(host, cfg, relay,
                             should_stop=lambda: shared.state.interrupted or bool(should_stop and should_stop()))
        finally:
            shared.state.end()
            if task_id:
                progress.finish_task(task_id)
            give_memory_back()


def give_memory_back() -> None:
    """After a run in the host's process: what the run freed goes back to the system. On Linux glibc keeps
    freed blocks for reuse, and a CPU run's many tensor sizes leave them scattered: the host's next model
    loads or LoRA merges then grow the process instead (seen with Forge on SDXL: 18 GB after a 4-step run)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc (Windows, macOS, musl): nothing to ask
        pass
