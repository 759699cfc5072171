"""Test-only Forge script (the real-Forge tier copies it into Forge's scripts/): the last CFG-denoised latents
of a generation, and a hash of the loaded model's weights (UNet, text encoders, VAE: the modules Forge's
patchers hold), through two HTTP routes."""
import base64
import hashlib

import torch
from modules import script_callbacks, shared

LAST = {}


def after_cfg(params):
    LAST["x"] = params.x.detach().float().cpu().clone()
    LAST["step"] = params.sampling_step


def weights_digest() -> dict:
    """{part: sha256 of its weights} of the UNet, the text encoders and the VAE."""
    from modules import sd_models

    sd_models.forge_model_reload()      # Forge loads its model at the first generation; this loads it now
    objects = shared.sd_model.forge_objects_original
    out = {}
    for part, module in (("unet", objects.unet.model), ("clip", objects.clip.cond_stage_model),
                         ("vae", objects.vae.first_stage_model)):
        h = hashlib.sha256()
        for key, value in sorted(module.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out[part] = h.hexdigest()
    return out


def routes(demo, app):
    @app.get("/probe/latents")
    def latents():
        x = LAST.pop("x", None)
        if x is None:
            return {"shape": None}
        return {"shape": list(x.shape), "step": LAST["step"], "data": base64.b64encode(x.numpy().tobytes()).decode()}

    @app.get("/probe/weights")
    def weights():
        info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        return {"sha256": weights_digest(), "checkpoint": getattr(info, "title", None)}


script_callbacks.on_cfg_after_cfg(after_cfg)
script_callbacks.on_app_started(routes)
