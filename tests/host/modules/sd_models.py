"""modules.sd_models, the checkpoint list and switching (1.10.1): CheckpointInfo (name relative to the models
folder, title 'name [shorthash]' once the hash is known, else the name), checkpoints_list by title,
checkpoint_aliases by every id, list_models() rescanning, get_closet_checkpoint_match(), and
reload_model_weights() loading a file's state dict into the model (strict=False) and firing model_loaded.
The `sd_model_checkpoint` setting's onchange reloads, as initialize_util registers it."""
import os

from modules import paths, script_callbacks, shared

model_path = os.path.join(paths.models_path, "Stable-diffusion")
checkpoints_list = {}
checkpoint_aliases = {}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        folder = shared.cmd_opts.ckpt_dir or model_path
        name = os.path.relpath(filename, folder) if filename.startswith(os.path.abspath(folder)) else os.path.basename(filename)
        self.name = name.replace("\\", "/")
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(self.name.replace("/", "_"))[0]
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = self.name
        self.ids = [self.model_name, self.title, self.name, self.name_for_extra]

    def register(self):
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self


def checkpoint_tiles(use_short=False):
    return [x.title for x in checkpoints_list.values()]


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    folder = os.path.abspath(shared.cmd_opts.ckpt_dir or model_path)
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, n) for n in names if n.endswith((".ckpt", ".safetensors"))
                  and not n.endswith((".vae.ckpt", ".vae.safetensors"))]
    for filename in sorted(found, key=str.lower):
        CheckpointInfo(filename).register()


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


def select_checkpoint():
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint)
    if info is None:
        if not checkpoints_list:
            raise FileNotFoundError("No checkpoints found")
        info = next(iter(checkpoints_list.values()))
    return info


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    from safetensors.torch import load_file

    info = info or select_checkpoint()
    sd_model = sd_model or shared.sd_model
    if getattr(sd_model, "sd_model_checkpoint", None) == info.filename and not forced_reload:
        return sd_model
    # loaded before the hijack in the webui, so the text encoder's keys have no `.wrapped.` there
    keys = {k.replace(".wrapped.", "."): k for k in sd_model.state_dict()}
    sd_model.load_state_dict({keys.get(k, k): v for k, v in load_file(info.filename).items()}, strict=False)
    sd_model.sd_model_checkpoint = info.filename
    sd_model.sd_checkpoint_info = info
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model


shared.opts.add_option("sd_model_checkpoint", shared.OptionInfo(None, "Stable Diffusion checkpoint"))
shared.opts.onchange("sd_model_checkpoint", lambda: reload_model_weights(), call=False)
