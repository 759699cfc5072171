"""modules.processing: the parameters of one generation (`p`) that extensions read and write."""


class StableDiffusionProcessing:
    def __init__(self, sd_model=None, prompt="", negative_prompt="", seed=-1, steps=20, cfg_scale=7.0,
                 width=512, height=512, batch_size=1, n_iter=1, sampler_name="Euler a", override_settings=None,
                 script_args=None, **kwargs):
        self.sd_model = sd_model
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.seed, self.steps, self.cfg_scale = seed, steps, cfg_scale
        self.width, self.height, self.batch_size, self.n_iter = width, height, batch_size, n_iter
        self.sampler_name = sampler_name
        self.override_settings = override_settings or {}
        self.script_args = script_args or []
        self.extra_generation_params = {}
        self.comments = {}
        self.all_prompts = [prompt] * batch_size * n_iter
        self.all_negative_prompts = [negative_prompt] * batch_size * n_iter
        self.all_seeds = [seed] * batch_size * n_iter
        self.all_subseeds = [-1] * batch_size * n_iter
        self.scripts = None
        for k, v in kwargs.items():
            setattr(self, k, v)

    def add_comment(self, text):
        self.comments[text] = 1


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    pass


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_images=None, denoising_strength=0.75, **kwargs):
        super().__init__(**kwargs)
        self.init_images = init_images or []
        self.denoising_strength = denoising_strength


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", infotexts=None, comments=""):
        self.images, self.seed, self.info, self.comments = images_list, seed, info, comments
        self.infotexts = infotexts or [info]
        self.extra_generation_params = p.extra_generation_params


class _Denoiser:
    """The webui's CFGDenoiser counts model evaluations (`step`) of `total_steps` (prompt editing reads them)."""
    def __init__(self, total_steps):
        self.step, self.total_steps = 0, total_steps


def process_images(p):
    """A generation as the webui runs it, around a tiny deterministic sampler: script hooks, sampling with
    the loaded model's UNet on its text conditioning, VAE decode, infotext."""
    import numpy as np
    import torch
    from PIL import Image

    from modules import infotext_utils, script_callbacks, shared

    model = p.sd_model or shared.sd_model
    if p.scripts is not None:
        p.scripts.before_process(p)
        p.scripts.process(p)
    with torch.no_grad():
        cond = model.get_learned_conditioning([p.prompt], p.width, p.height) if model.is_sdxl else \
            model.get_learned_conditioning([p.prompt])
        # sgm's UNet takes the SDXL dict's parts as context and y
        unet_args = dict(context=cond["crossattn"], y=cond["vector"]) if isinstance(cond, dict) else dict(context=cond)
        g = torch.Generator().manual_seed(int(p.seed))
        latent = torch.randn(1, 4, p.height // 8, p.width // 8, generator=g)
        denoiser = _Denoiser(p.steps)
        for i, t in enumerate(torch.linspace(900, 100, p.steps).long()):
            shared.state.sampling_step, shared.state.sampling_steps = i, p.steps
            script_callbacks.cfg_denoiser_callback(script_callbacks.CFGDenoiserParams(
                latent, None, t, i, p.steps, cond, None, denoiser))
            eps = model.model.diffusion_model(latent, t[None], **unet_args)
            denoiser.step += 1
            latent = latent - eps / p.steps
        image = model.first_stage_model.decode(latent)[0]
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    info = infotext_utils.create_infotext(p)
    processed = Processed(p, [Image.fromarray(np.ascontiguousarray(pixels))], p.seed, info,
                          comments="\n".join(p.comments))
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed
