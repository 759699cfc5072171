"""modules.call_queue: one lock serialises GPU work (generation, training) across requests."""
import threading

from modules import shared

queue_lock = threading.Lock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        with queue_lock:
            shared.state.begin(job=getattr(func, "__name__", "job"))
            try:
                return func(*args, **kwargs)
            finally:
                shared.state.end()
    return f
