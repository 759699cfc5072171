"""modules.script_callbacks: extensions register functions the webui calls at points of its life."""
from collections import defaultdict

callback_map = defaultdict(list)


def clear_callbacks():
    callback_map.clear()


def _add(category, fn):
    callback_map[category].append(fn)


def on_app_started(callback, *, name=None):
    _add("callbacks_app_started", callback)


def on_model_loaded(callback, *, name=None):
    _add("callbacks_model_loaded", callback)


def on_ui_tabs(callback, *, name=None):
    _add("callbacks_ui_tabs", callback)


def on_ui_settings(callback, *, name=None):
    _add("callbacks_ui_settings", callback)


def on_infotext_pasted(callback, *, name=None):
    _add("callbacks_infotext_pasted", callback)


def on_script_unloaded(callback, *, name=None):
    _add("callbacks_script_unloaded", callback)


def on_before_ui(callback, *, name=None):
    _add("callbacks_before_ui", callback)


class CFGDenoiserParams:
    """What the webui's CFG denoiser hands its callbacks before each model evaluation."""
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


def on_cfg_denoiser(callback, *, name=None):
    _add("callbacks_cfg_denoiser", callback)


def cfg_denoiser_callback(params):
    # the webui reports a callback's exception and goes on sampling
    for c in callback_map["callbacks_cfg_denoiser"]:
        try:
            c(params)
        except Exception as e:
            print(f"Error executing callback cfg_denoiser_callback for {c}: {e}")


def app_started_callback(demo, app):
    for c in callback_map["callbacks_app_started"]:
        c(demo, app)


def model_loaded_callback(sd_model):
    for c in callback_map["callbacks_model_loaded"]:
        c(sd_model)


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        res += c() or []
    return res


def ui_settings_callback():
    for c in callback_map["callbacks_ui_settings"]:
        c()


def infotext_pasted_callback(infotext, params):
    for c in callback_map["callbacks_infotext_pasted"]:
        c(infotext, params)


def script_unloaded_callback():
    for c in callback_map["callbacks_script_unloaded"]:
        c()
