"""The host adapter over the webui's loaded model (`modules.shared.sd_model`), or anything with its layout
(the tiny test models). It needs nothing from the webui's `modules` package: the model object is enough
(running a job inside the webui is lora_ext.glue's)."""
from __future__ import annotations

from functools import cached_property

from .. import naming
from . import builtin_lora, text_encoding
from .base import ConditioningMixin, LdmLayoutMixin, bind
from .conditioning import Text


class WebuiHost(LdmLayoutMixin, ConditioningMixin):
    def __init__(self, sd_model):
        self.model = sd_model

    @staticmethod
    def accepts(model) -> bool:
        """A model in the webui's (ldm / sgm) layout: its UNet at .model.diffusion_model."""
        return hasattr(getattr(model, "model", None), "diffusion_model")

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

    @cached_property
    def _applied(self) -> dict:
        return {**self._bound, **bind(self.model, naming.extra_targets(self.arch))}

    def applied_targets(self) -> dict:
        """lora_targets and the layers files may change beyond them (naming.extra_targets)."""
        return self._applied

    # --- what training and sampling need ----------------------------------------------------------------

    @property
    def unet(self):
        return self.model.model.diffusion_model

    @property
    def vae(self):
        return self.model.first_stage_model

    def text_holders(self) -> list:
        m = self.model
        if getattr(m, "is_sdxl", False):      # the text embedders (the size embedders hold no `.wrapped`)
            return [e.wrapped for e in m.conditioner.embedders if hasattr(e, "wrapped")]
        return [m.cond_stage_model.wrapped]

    def text_encoders(self) -> list:
        """The text encoder modules (to move off the device once their outputs are cached)."""
        return self.text_holders()

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.model, "scale_factor", 0.13025 if self.arch.name == "sdxl" else 0.18215))

    def count_tokens(self, text: str) -> int:
        return len(text_encoding.tokenize(self.text_holders()[0], [text])[0])

    def encode_text(self, prompts: list, clip_skip: int = 1, max_tokens: int = 75) -> Text:
        """Per-token states [batch, 77 * chunks, dim]: each prompt cut or padded to `max_tokens` (75, 150,
        225), split in 75-token chunks, each encoded with its own start/end tokens and the results joined, as
        the webui does at generation time. SDXL: both encoders side by side, and the pooled output."""
        return text_encoding.encode(self.text_holders(), prompts, clip_skip, max_tokens, self.arch.name == "sdxl")

    @property
    def pooled_width(self) -> int | None:
        """SDXL: the width of the second encoder's pooled, projected output (real: 1280)."""
        if not hasattr(self.unet, "label_emb"):
            return None
        return self.text_holders()[-1].model.text_projection.shape[1]

    @property
    def size_dim(self) -> int | None:
        """SDXL: channels per size number, what label_emb takes beyond the pooled text (real models: 256)."""
        return None if self.pooled_width is None else self._size_dim(self.pooled_width)

    # --- living beside the webui's built-in Lora, and its faster attention -------------------------------

    def pristine_weight(self, bound):
        """The weight before any network (the built-in Lora's backup when it holds one), or None = the live one."""
        return builtin_lora.backup_of(bound)

    def weight_written(self, bound, weight) -> None:
        builtin_lora.hand_over(bound, weight)

    def training_weights(self):
        """While training, the model holds the checkpoint's own weights (the built-in's deltas set aside)."""
        return builtin_lora.checkpoint_weights(self.model)
