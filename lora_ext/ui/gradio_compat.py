"""The differences between gradio 3 (AUTOMATIC1111 1.10: 3.41) and gradio 4 (Forge: 4.40) that our tab and
panel meet, in one place. Each is decided by what the installed gradio accepts (its signatures), never by its
version string; Forge also patches some of these, but the tab must not depend on a host's patches."""
from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _event_parameters() -> frozenset:
    import gradio as gr

    with gr.Blocks():
        button = gr.Button()
    return frozenset(inspect.signature(button.click).parameters)


def js(code: str | None) -> dict:
    """The keyword that runs `code` in the browser before an event's handler: `_js` (3) or `js` (4)."""
    if not code:
        return {}
    return {"js": code} if "js" in _event_parameters() else {"_js": code}


def queue(block, workers: int):
    """The block's queue with `workers` events at once: concurrency_count (3) or default_concurrency_limit (4)."""
    accepted = inspect.signature(block.queue).parameters
    key = "default_concurrency_limit" if "default_concurrency_limit" in accepted else "concurrency_count"
    return block.queue(**{key: workers})


def upload_only() -> dict:
    """An image component's keyword for "upload only": source="upload" (3) or sources=["upload"] (4)."""
    import gradio as gr

    accepted = inspect.signature(gr.Image.__init__).parameters
    return {"sources": ["upload"]} if "sources" in accepted else {"source": "upload"}
