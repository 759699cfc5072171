"""The host adapter over the webui's loaded model (`modules.shared.sd_model`), or anything with its layout
(the tiny test models). It needs nothing from the webui's `modules` package: the model object is enough."""
from __future__ import annotations

from functools import cached_property

from .. import naming
from .base import bind


class WebuiHost:
    def __init__(self, sd_model):
        self.model = sd_model

    @cached_property
    def arch(self) -> naming.Arch:
        return naming.arch_from_model(self.model)

    @property
    def prediction(self) -> str:
        return "v" if getattr(self.model, "parameterization", "eps") == "v" else "eps"

    @property
    def alphas_cumprod(self):
        return self.model.alphas_cumprod

    @cached_property
    def _bound(self) -> dict:
        return bind(self.model, naming.targets(self.arch))

    def lora_targets(self) -> dict:
        """{kohya name: Bound} for every target of the loaded model."""
        return self._bound
