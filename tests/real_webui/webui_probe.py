"""Test-only webui script (the real-webui tier copies it into the webui's scripts/): the last CFG-denoised
latents of a generation (a random tiny VAE decodes everything to nearly flat grey, so images cannot tell
two generations apart), and a hash of the loaded model's weights, through two HTTP routes. It also registers
the tiny SDXL's open_clip config."""
import base64
import hashlib
import os

import torch
from modules import paths, script_callbacks, shared

# the tiny SDXL's bigG is built by open_clip from a model config of that name, as the real one is built
# from ViT-bigG-14's: registered here, at script loading, before the webui loads a model
_OPENCLIP = os.path.join(paths.script_path, "lora_ext_test_openclip")
if os.path.isdir(_OPENCLIP):
    import open_clip
    open_clip.add_model_config(_OPENCLIP)

LAST = {}


def after_cfg(params):
    LAST["x"] = params.x.detach().float().cpu().clone()
    LAST["step"] = params.sampling_step


def weights_digest():
    h = hashlib.sha256()
    for key, value in sorted(shared.sd_model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def routes(demo, app):
    @app.get("/probe/latents")
    def latents():
        x = LAST.pop("x", None)
        if x is None:
            return {"shape": None}
        return {"shape": list(x.shape), "step": LAST["step"], "data": base64.b64encode(x.numpy().tobytes()).decode()}

    @app.get("/probe/xyz_index")
    def xyz_index(label: str):
        """The X/Y/Z script's txt2img index of an axis (its API args take the index, not the label)."""
        from modules import scripts
        xyz = next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")
        options = [x for x in xyz.axis_options if type(x) == xyz.AxisOption or not x.is_img2img]
        return {"index": [o.label for o in options].index(label)}

    @app.get("/probe/weights")
    def weights():
        info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        return {"sha256": weights_digest(), "checkpoint": getattr(info, "title", None)}


script_callbacks.on_cfg_after_cfg(after_cfg)
script_callbacks.on_app_started(routes)
