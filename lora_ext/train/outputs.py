"""Where a run will write, checked before the first step: a name that stays in its folder, a folder that is a
folder and takes files, no file replaced unless asked, no input written over. Finding these after an hour of
training would lose the hour."""
from __future__ import annotations

import contextlib
import os

from .config import ConfigError, TrainConfig

_BAD_CHARS = set('/\\:*?"<>|\0')


def final_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.output_dir, f"{cfg.output_name}.safetensors")


def check_outputs(cfg: TrainConfig) -> None:
    """Raises ConfigError saying what to change. Writes nothing (a folder to be created is checked at its
    nearest existing parent)."""
    name = cfg.output_name
    if not name or name in (".", "..") or name.startswith(".") or _BAD_CHARS & set(name) or len(name) > 200:
        raise ConfigError(f"output_name {name!r} must be a plain file name (no folders, no leading '.', none of "
                          f"{''.join(sorted(_BAD_CHARS - {chr(0)}))}); put folders in output_dir")
    for option in ("output_dir", "state_dir"):
        folder = getattr(cfg, option) or (cfg.output_dir if option == "state_dir" else "")
        _writable_folder(option, folder or ".")
    out = final_path(cfg)
    if os.path.exists(out) and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"{out} exists; choose another output_name, or allow overwriting (--overwrite)")
    if cfg.network_weights and os.path.exists(cfg.network_weights) and os.path.exists(out) \
            and os.path.samefile(cfg.network_weights, out):
        raise ConfigError(f"output {out} is the network_weights file it starts from; choose another output_name")


def _writable_folder(option: str, folder: str) -> None:
    existing = os.path.abspath(folder)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == os.path.abspath(folder) else f" (its parent {existing!r})"
        raise ConfigError(f"{option} {folder!r}{where} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {folder!r} cannot be written (no permission on {existing!r}); choose "
                          "another folder")


@contextlib.contextmanager
def claimed(cfg: TrainConfig):
    """Holds the run's output (output_dir + output_name: its LoRA, numbered saves and state) for the length of
    the run: a second run started on the same output, in this process or another, is refused instead of both
    writing one file. An OS lock on a hidden file beside the output: released by the system when a process is
    killed (kill -9 leaves no claim behind), the file removed at the end."""
    os.makedirs(cfg.output_dir or ".", exist_ok=True)
    path = os.path.join(cfg.output_dir or ".", f".{cfg.output_name}.lora_ext-claim")
    fd = _lock(path, final_path(cfg))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)         # while still locked: a run waiting on this file finds it gone and retries
        _unlock(fd)


def _lock(path: str, out: str) -> int:
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise ConfigError(f"another training run is writing {out} now; wait for it to end, or choose another "
                              "output_name")
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:        # the file the lock is on is still the claim's (not one a finishing run just removed)
            return fd
        _unlock(fd)
    raise ConfigError(f"could not claim {out}: its claim file {path} keeps changing")


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:         # Windows
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(fd: int) -> None:
    try:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_UN)
    except ImportError:
        import msvcrt
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    os.close(fd)
