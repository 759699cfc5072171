"""The seam between the training loop and the parts of a run it calls at fixed moments and otherwise knows
nothing of: numbered saves, previews, and next an EMA of the weights, a validation loss, class images. Each is
a Feature in a file of its own here and a line in FEATURES; the loop calls every one its run's options want:

- before_scan(host, cfg)        before the dataset is read (class images would be made here)
- at_start(loop)                before the run's first step (or a resumed run's next)
- after_step(loop, step, epoch) after each optimizer step (`loop`: train.loop._Loop, its `r` the Run)
- after_epoch(loop, epoch, last) after each whole epoch (`last`: the run's last step is done)
- metadata(loop)                what each saved LoRA records of it (ss_* / lora_ext_* keys)
- state() / load_state(values, tensors)  what it keeps in a resumable state: JSON values and tensors

A feature that needs none of these leaves them as they are here."""
from __future__ import annotations

from ...registry import classes


class Feature:
    name = ""               # its key in the resumable state

    @classmethod
    def wanted(cls, cfg) -> bool:
        """Whether the run's options ask for it (a feature not wanted is not made)."""
        return True

    def before_scan(self, host, cfg) -> None:
        pass

    def at_start(self, loop) -> None:
        pass

    def after_step(self, loop, step: int, epoch: int) -> None:
        pass

    def after_epoch(self, loop, epoch: int, last: bool) -> None:
        pass

    def metadata(self, loop) -> dict:
        return {}

    def state(self) -> tuple[dict, dict]:
        """(JSON values, {name: tensor}) to keep in a resumable state."""
        return {}, {}

    def load_state(self, values: dict, tensors: dict) -> None:
        pass


# "module:Class" in the order the loop calls them
FEATURES = ("lora_ext.train.features.previews:Previews", "lora_ext.train.features.snapshots:Snapshots")


def registered() -> list:
    return classes(FEATURES)


def for_run(cfg) -> list:
    """The features a run with these options wants, made."""
    return [cls() for cls in registered() if cls.wanted(cfg)]
