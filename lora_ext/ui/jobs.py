"""Long work started from a tab (a merge of gigabytes) in a thread of its own: the click's handler answers
at once, or with the result if it came within a second, and the tab's 2-second poll shows how the work goes,
then what it gave. A handler that held the request for minutes left the page with no word of progress, and
behind gradio's queue it held other requests up."""
from __future__ import annotations

import threading


class Job:
    def __init__(self, name: str):
        self.name = name
        self._thread = None
        self._lock = threading.Lock()
        self.progress = ""          # set by the work, e.g. "412 of 1131 tensors"
        self.result = None          # the work's message, once it has ended
        self._shown = True          # whether the poll has shown the latest result

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self, work, wait_s: float = 1.0) -> str:
        """Starts `work(job)` (returns a message; expected failures are messages too) unless one runs;
        the message, if it ends within `wait_s`, else a line saying it goes on."""
        with self._lock:
            if self.running:
                return f"**Not now:** a {self.name} is still running ({self.progress or 'starting'})."
            self.progress, self.result, self._shown = "", None, False
            self._thread = threading.Thread(target=self._work, args=(work,), daemon=True)
            self._thread.start()
        self._thread.join(wait_s)
        if not self.running:
            self._shown = True
            return self.result
        return self._working()

    def _work(self, work) -> None:
        try:
            self.result = work(self)
        except Exception as e:          # unexpected: still a message in the page, never a traceback
            self.result = f"**The {self.name} stopped:** {type(e).__name__}: {e}"
            console_traceback(e)

    def _working(self) -> str:
        return f"Working on the {self.name}{': ' + self.progress if self.progress else ''}..."

    def poll(self):
        """What the message box should show now: the progress while running, the result once (then None:
        leave the box as it is, it may hold another action's message)."""
        if self.running:
            return self._working()
        if not self._shown and self.result is not None:
            self._shown = True
            return self.result
        return None


def console_traceback(error: BaseException) -> None:
    """A failure that is not bad input (ValueError: our checks; OSError: the disk) is a bug to report: its
    traceback goes to the console (the webui's terminal), as the webui does with its own errors; the page
    shows only the message."""
    if not isinstance(error, (ValueError, OSError)):
        import traceback
        traceback.print_exception(type(error), error, error.__traceback__)
