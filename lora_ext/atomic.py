"""Writing files so that nothing is lost: a temp name beside the target, renamed into place (a crash never
leaves a half-written file under the real name), no existing file replaced unless asked, the temp files a
killed process of ours left removed by the next write into the folder, and no input ever used as an output."""
from __future__ import annotations

import os
import tempfile


class SameFile(ValueError):
    """An output that is one of the inputs."""


def refuse_inputs_as_output(out: str, inputs) -> None:
    """Raises SameFile if `out` is (by path, link or inode) one of `inputs`: no input is ever written over."""
    for path in inputs:
        same = os.path.abspath(out) == os.path.abspath(path) or (
            os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path))
        if same:
            raise SameFile(f"the output {out} is one of the inputs ({path}); choose another name")


TEMP_PREFIX = ".tmp-lora_ext-"


def atomic_write(path: str, data, overwrite: bool = False) -> None:
    """Writes `data` (bytes, or a function that writes into a binary file) to a temporary file beside `path`,
    then renames it into place: a crash never leaves a half-written file under the real name, and an existing
    file stays unless `overwrite`. The file gets the mode the umask gives (as open() would), and temp files
    that a killed process of ours left in the folder are removed."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(folder)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=f"-{os.path.basename(path)}"[:64],
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    try:            # Linux tells it without changing it (other threads may be creating files)
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    mask = os.umask(0o022)       # elsewhere, reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def remove_stale_temp_files(folder: str) -> list:
    """Deletes our temp files in `folder` whose writing process is gone (killed mid-write); returns them."""
    removed = []
    try:
        names = [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX)]
    except OSError:
        return removed
    for name in names:
        pid = name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:         # exists, someone else's
        return True
    return True
