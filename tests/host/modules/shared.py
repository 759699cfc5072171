"""modules.shared: the loaded model, options, job state and command-line options."""
import argparse
import os

from modules import paths
from modules.shared_state import State

sd_model = None

cmd_opts = argparse.Namespace(
    lora_dir=os.path.join(paths.models_path, "Lora"), ckpt_dir=None, medvram=False, lowvram=False,
    medvram_sdxl=False, api=False, listen=False, no_half=False, precision="autocast", device_id=None,
)


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, comment_before="", comment_after="", infotext=None,
                 restrict_api=False, category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.onchange, self.section, self.refresh, self.infotext = onchange, section, refresh, infotext
        self.comment_before, self.comment_after = comment_before, comment_after

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def needs_reload_ui(self):
        return self


class Options:
    """Settings: values in `data`, declarations in `data_labels`; attribute access falls back to defaults."""

    def __init__(self):
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value

    def set(self, key, value):
        old = self.data.get(key)
        self.data[key] = value
        info = self.data_labels.get(key)
        if info is not None and info.onchange is not None and old != value:
            info.onchange()
        return True

    def onchange(self, key, func, call=True):
        self.data_labels[key].onchange = func
        if call:
            func()


opts = Options()
state = State()
interrogator = None     # the webui's InterrogateModels (CLIP interrogator); tests may put a double here


def refresh_checkpoints():
    from modules import sd_models
    return sd_models.list_models()
