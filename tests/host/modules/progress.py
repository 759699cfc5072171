"""modules.progress (1.10.1): the task the progress API reports on. A task id is queued, started when its job
takes the lock, and finished at its end; /internal/progress answers 'active' for the current one."""
from collections import OrderedDict
import time

current_task = None
pending_tasks = OrderedDict()
finished_tasks = []


def start_task(id_task):
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        finished_tasks.pop(0)


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()
