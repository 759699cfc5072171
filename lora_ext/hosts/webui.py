"""The host adapter over the webui's loaded model (`modules.shared.sd_model`), or anything with its layout
(the tiny test models). It needs nothing from the webui's `modules` package: the model object is enough."""
from __future__ import annotations

from functools import cached_property

from .. import naming
from . import builtin_lora, text_encoding
from .base import bind, sample_latents


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

    # --- what training and sampling need ----------------------------------------------------------------

    @property
    def unet(self):
        return self.model.model.diffusion_model

    @property
    def vae(self):
        return self.model.first_stage_model

    def text_holders(self) -> list:
        m = self.model
        return [e.wrapped for e in m.conditioner.embedders] if getattr(m, "is_sdxl", False) else [m.cond_stage_model.wrapped]

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.model, "scale_factor", 0.13025 if self.arch.name == "sdxl" else 0.18215))

    def checkpoint_blocks(self) -> list:
        """The UNet blocks gradient checkpointing wraps."""
        unet = self.unet
        return list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)

    def count_tokens(self, text: str) -> int:
        return len(text_encoding.tokenize(self.text_holders()[0], [text])[0])

    def encode_prompts(self, prompts: list, clip_skip: int = 1, max_tokens: int = 75):
        """Per-token conditioning [batch, 77 * chunks, dim]: each prompt cut or padded to `max_tokens`
        (75, 150, 225), split in 75-token chunks, each encoded with its own start/end tokens and the results
        joined, as the webui does at generation time. SDXL: both encoders side by side."""
        return text_encoding.encode(self.text_holders(), prompts, clip_skip, max_tokens, self.arch.name == "sdxl")

    def encode_images(self, pixels, seeds=None):
        """Latents (scaled) of images in [-1, 1]: a sample of the VAE's distribution per image, drawn with
        that image's seed (the distribution's mean without seeds)."""
        p = next(self.vae.parameters())
        dist = self.vae.encode(pixels.to(p.device, p.dtype))
        return sample_latents(dist.mean, dist.std, seeds, self.latent_scale)

    def decode_latents(self, latents):
        p = next(self.vae.parameters())
        return self.vae.decode((latents / self.latent_scale).to(p.device, p.dtype))

    def predict(self, noisy, timesteps, cond):
        if hasattr(self.unet, "label_emb"):
            raise NotImplementedError("training SDXL on the webui's model needs its size conditioning (ADM "
                                      "vector), which lora_ext does not build yet")
        p = next(self.unet.parameters())
        return self.unet(noisy.to(p.device, p.dtype), timesteps.to(p.device), context=cond.to(p.device, p.dtype))


def train_as_webui_job(cfg, on_event=None, before=None, should_stop=None, task_id=None):
    """Trains on the webui's loaded model in place, as one of its jobs: behind the lock that serialises
    generation (so the two never overlap), with the webui's progress state (job, step counter, text) and
    its Interrupt button as the cancel. `before(host)` runs first, under the lock (the panel gives its
    merged LoRAs back there, so training starts from the checkpoint's own weights). `task_id`: the id the
    page's progress bar asks the webui's progress API about (queued, then current while the run goes)."""
    from modules import call_queue, progress, shared

    from ..train.loop import train

    if task_id:
        progress.add_task_to_queue(task_id)
    with call_queue.queue_lock:
        if task_id:
            progress.start_task(task_id)
        host = WebuiHost(shared.sd_model)
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
            with builtin_lora.checkpoint_weights(host.model):
                return train(host, cfg, relay,
                             should_stop=lambda: shared.state.interrupted or bool(should_stop and should_stop()))
        finally:
            shared.state.end()
            if task_id:
                progress.finish_task(task_id)
