"""Webui glue: registers the LoRA tab, the Additional Networks panel, settings, X/Y/Z axes and API routes.
No logic beyond wiring: everything here calls lora_ext, which never imports the webui's modules itself."""
import contextlib
import os
import sys

import gradio as gr
from modules import script_callbacks, scripts, shared

from lora_ext.hosts import UnsupportedModel
from lora_ext.library import LoraLibrary
from lora_ext.panel import slots as slotlib
from lora_ext.panel import ui as panel
from lora_ext.ui import tab

SECTION = ("lora_ext", "LoRA (lora_ext)")
DEFAULTS = {"lora_ext_slots": 5, "lora_ext_extra_dirs": "", "lora_ext_cache_mb": 1024, "lora_ext_mode": "merge"}


def opt(key):
    """A setting, or its default before the settings are registered."""
    try:
        return getattr(shared.opts, key)
    except AttributeError:
        return DEFAULTS[key]


def lora_folders():
    main = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join("models", "Lora")
    extra = [d.strip() for d in str(opt("lora_ext_extra_dirs") or "").split(",") if d.strip()]
    return [main] + extra


def webui_hash(path, name):
    """The webui's own hash cache (hashing hundreds of files at start-up is what made the old extension slow)."""
    try:
        from modules import hashes
        return hashes.sha256_from_cache(path, f"lora/{name}", use_addnet_hash=path.endswith(".safetensors"))
    except Exception:
        return None


LIBRARY = LoraLibrary(lora_folders, webui_hash)


class Runtime:
    """Created on first use, so that the webui's start-up does not import torch-side code for us."""
    _instance = None
    _host = None        # the adapter of the model in use; only that one, so an unloaded model can go
    _for = None         # the model it was made for (Forge's adapter has a root module of its own)
    edits_seen = 0      # the engine's text-encoder edit count when the webui last computed conditioning

    @classmethod
    def get(cls):
        if cls._instance is None:
            from lora_ext.panel.runtime import PanelRuntime
            presets = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "block_presets.txt")
            cls._instance = PanelRuntime(LIBRARY, int(opt("lora_ext_cache_mb")) << 20, block_presets=presets)
        return cls._instance

    @classmethod
    def host(cls, sd_model):
        from lora_ext.hosts import for_model
        if cls._host is None or cls._for is not sd_model:
            cls._host, cls._for = for_model(sd_model), sd_model
        return cls._host


def loaded_host():
    """The adapter of the loaded model. Forge loads its model at the first generation: there, a tab that asks
    before any generation has it loaded now."""
    from modules import sd_models

    reload = getattr(sd_models, "forge_model_reload", None)
    if reload is not None and getattr(shared.sd_model, "forge_objects", None) is None:
        reload()
    return Runtime.host(shared.sd_model)


def give_back(host):
    """The panel's LoRAs out of the model's weights (before training or a comparison uses it)."""
    if Runtime._instance is not None:
        Runtime._instance.restore(host)


def train_in_webui(cfg, on_event=None, should_stop=None, task_id=None):
    """Training on the loaded model (the tab and the API call this): the panel's LoRAs are given back first."""
    from lora_ext.glue.webui_job import train_as_webui_job

    if not cfg.state_dir:
        # resumable states stay out of models/Lora: its lists (ours, the built-in's cards) would offer them
        import dataclasses

        from modules import paths
        cfg = dataclasses.replace(cfg, state_dir=os.path.join(paths.models_path, "lora_ext_states"))
    return train_as_webui_job(cfg, on_event, before=give_back, should_stop=should_stop, task_id=task_id,
                              host_fn=loaded_host)


def checkpoints_folder():
    from modules import paths
    return getattr(shared.cmd_opts, "ckpt_dir", None) or os.path.join(paths.models_path, "Stable-diffusion")


def refresh_lists(kind, path):
    """A file we wrote shows up in the webui's own lists: the checkpoint dropdown, the built-in Lora's cards."""
    if kind == "checkpoint":
        shared.refresh_checkpoints()
        return
    networks = sys.modules.get("networks")     # the built-in Lora extension's module, when it is loaded
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


def checkpoint_names():
    from modules import sd_models
    shared.refresh_checkpoints()
    return sd_models.checkpoint_tiles()


def switch_checkpoint(name):
    """Loads another checkpoint the webui's own way (its setting; the webui reloads the weights)."""
    from modules import sd_models
    info = sd_models.get_closet_checkpoint_match(name)
    if info is None:
        return f"**No checkpoint {name!r}** in the webui's list; press Refresh."
    if Runtime._instance is not None and Runtime._host is not None:
        from modules import call_queue
        with call_queue.queue_lock:     # the webui may keep this model for later: without our LoRAs in it
            Runtime._instance.restore(Runtime._host)
    shared.opts.set("sd_model_checkpoint", info.title)      # its onchange takes the lock and reloads
    return f"Loaded **{info.title}**."


def model_label():
    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    return f"Training uses the checkpoint loaded in the webui: **{getattr(info, 'title', 'none loaded')}**."


def interrogators():
    """The webui's own captioners, when it has them: CLIP (BLIP + CLIP) and DeepBooru."""
    import importlib.util
    found = {}
    if getattr(shared, "interrogator", None) is not None:
        found["CLIP"] = lambda image: shared.interrogator.interrogate(image)
    if importlib.util.find_spec("modules.deepbooru") is not None:
        def deepbooru(image):
            from modules import deepbooru as db
            return db.model.tag(image)
        found["DeepBooru"] = deepbooru
    return found


class ModelBusy(RuntimeError):
    pass


@contextlib.contextmanager
def model_if_free():
    """The webui's generation lock if nobody holds it; else ModelBusy at once (a button never hangs for the
    length of someone's training run)."""
    from modules import call_queue
    if not call_queue.queue_lock.acquire(blocking=False):
        raise ModelBusy("the model is busy (a generation or a training run); try again when it is done")
    try:
        yield
    finally:
        call_queue.queue_lock.release()


def bake(items):
    from lora_ext.panel.runtime import Outcome
    try:
        with model_if_free():
            return Runtime.get().bake(loaded_host(), items)
    except ModelBusy as e:
        return Outcome(messages=[str(e)])


def compare_folder():
    from modules import paths
    return os.path.join(paths.data_path, "outputs", "lora_ext_compare")


def compare_renderer():
    """The comparison's cells made by the webui's own txt2img (its sampler, its scripts, its infotext), the
    LoRA carried by our panel's first slot; the panel gives the weights back at the end."""
    from modules import processing
    from modules import scripts as webui_scripts

    runner = webui_scripts.scripts_txt2img
    ours = next(s for s in runner.alwayson_scripts if isinstance(s, AdditionalNetworks))
    defaults = [None] * max(s.args_to for s in runner.scripts)
    for script in runner.scripts:
        components = runner.inputs[script.args_from:script.args_to]
        defaults[script.args_from:script.args_to] = [getattr(c, "value", None) for c in components]
    folder = os.path.abspath(lora_folders()[0])

    def render(plan, save, weight, prompt):
        args = list(defaults)
        args[ours.args_from:ours.args_to] = [None] * (ours.args_to - ours.args_from)
        name = os.path.relpath(os.path.abspath(save.path), folder).replace(os.sep, "/")
        args[ours.args_from] = {"enabled": True, "model": name, "weight": weight}
        width, height = plan.size
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompt, negative_prompt=plan.negative, seed=plan.seed, steps=plan.steps,
            cfg_scale=plan.cfg_scale, width=width, height=height, sampler_name="Euler", do_not_save_samples=True,
            do_not_save_grid=True)
        p.is_api = True         # the webui's own seed / sampler scripts would set those from their UI defaults
        p.scripts, p.script_args = runner, args
        processed = processing.process_images(p)
        image = processed.images[0]
        said = processed.infotexts[0]
        if "AddNet Model 1:" not in said:       # the panel refused the file: no cell may carry its label
            from lora_ext.tools.compare import CompareError
            warning = said.partition("AddNet Warning: ")[2][:300] or "see the console"
            raise CompareError(f"{name} was not applied ({warning}); the comparison stops")
        image.info["parameters"] = said
        return image
    render.close = lambda: give_back(Runtime.host(shared.sd_model))
    return render


def tab_context():
    from lora_ext.ui.tab import TabContext
    from lora_ext.ui.training_session import TrainingSession

    return TabContext(lambda: lora_folders()[0], checkpoints_folder, LIBRARY,
                      TrainingSession(train_in_webui, on_written=refresh_lists),
                      loaded_host, os.path.join(os.path.dirname(__file__), "..", "presets"),
                      model_label_fn=model_label, lock=model_if_free, checkpoints_fn=checkpoint_names,
                      switch_fn=switch_checkpoint, on_written=refresh_lists, interrogators=interrogators(),
                      bake_fn=bake, progress_js="loraExtTrain", release_fn=give_back,
                      compare_folder_fn=compare_folder, compare_renderer_fn=compare_renderer)


def info_line(name):
    return Runtime.get().info_line(name)


def on_ui_settings():
    opts = [
        ("lora_ext_slots", shared.OptionInfo(DEFAULTS["lora_ext_slots"], "Additional Networks: number of slots (needs a UI reload)",
                                             gr.Slider, {"minimum": 1, "maximum": 20, "step": 1}, section=SECTION)),
        ("lora_ext_extra_dirs", shared.OptionInfo("", "Extra LoRA folders, comma-separated", section=SECTION)),
        ("lora_ext_cache_mb", shared.OptionInfo(1024, "LoRA files kept in memory (MB)", gr.Number, section=SECTION)),
        ("lora_ext_mode", shared.OptionInfo("merge", "How LoRAs are applied: merge into the weights (no cost per "
                                            "step) or add in the forward pass (bypass)", gr.Radio,
                                            {"choices": ["merge", "bypass"]}, section=SECTION)),
    ]
    for key, info in opts:
        shared.opts.add_option(key, info)


def on_model_loaded(sd_model):
    # the webui loaded weights into this model: our copies of its old weights are stale
    if Runtime._instance is not None:
        Runtime._instance.forget(sd_model)


def on_script_unloaded():
    # the model the panel last worked on (Forge may have none loaded yet: then there is nothing to give back)
    if Runtime._instance is not None and Runtime._host is not None:
        Runtime._instance.restore(Runtime._host)


def on_cfg_denoiser(params):
    """Before each model evaluation: slots with a step range switch their UNet part on or off. The step is
    the denoiser's count of evaluations of its total, as the webui's own prompt editing counts them."""
    if Runtime._instance is None or shared.sd_model is None:
        return
    denoiser = getattr(params, "denoiser", None)
    step, total = getattr(denoiser, "step", None), getattr(denoiser, "total_steps", None)
    if not isinstance(step, int) or not total:
        step, total = params.sampling_step, params.total_sampling_steps
    Runtime._instance.step(Runtime.host(shared.sd_model), step, total)


def on_app_started(demo, app):
    from lora_ext.panel.api import add_routes
    add_routes(app, LIBRARY, info_line)


def on_before_ui():
    """X/Y/Z plot axes for each slot's model and weights (the xyz_grid script is loaded by then)."""
    xyz = next((d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"), None)
    if xyz is None:
        return

    def setter(index, field, extra=None):
        def apply(p, x, xs):
            overrides = dict(getattr(p, "lora_ext_overrides", {}))
            overrides[index] = {**overrides.get(index, {}), field: x, **(extra or {})}
            p.lora_ext_overrides = overrides
        return apply

    for i in range(int(opt("lora_ext_slots"))):
        n = i + 1
        xyz.axis_options += [
            xyz.AxisOption(f"[AddNet] Model {n}", str, setter(i, "model", {"enabled": True}),
                           choices=lambda: [slotlib.NONE] + LIBRARY.names()),
            xyz.AxisOption(f"[AddNet] Weight {n}", float, setter(i, "weight", {"separate": False})),
            xyz.AxisOption(f"[AddNet] UNet Weight {n}", float, setter(i, "unet", {"separate": True})),
            xyz.AxisOption(f"[AddNet] TEnc Weight {n}", float, setter(i, "te", {"separate": True})),
            xyz.AxisOption(f"[AddNet] Block Weights {n}", str, setter(i, "block_weights", {})),
            xyz.AxisOption(f"[AddNet] Start {n}", float, setter(i, "start", {})),
            xyz.AxisOption(f"[AddNet] Stop {n}", float, setter(i, "stop", {})),
        ]


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_model_loaded(on_model_loaded)
script_callbacks.on_script_unloaded(on_script_unloaded)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
script_callbacks.on_before_ui(on_before_ui)
script_callbacks.on_ui_tabs(lambda: [(tab.build_tab(tab_context()), "LoRA", "lora_ext")])


def forget_conditioning(p):
    """The webui keeps the last prompts' conditioning (shared by all generations) and reuses it while its
    key (prompt, steps, checkpoint, <lora:> networks ...) is unchanged; our text-encoder LoRAs are not in
    that key, so after they change it must be computed again. (A cache is [key, conditioning] in A1111 and
    [key, conditioning, its extra-network key] in Forge.)"""
    for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
        cache = getattr(p, name, None)
        if isinstance(cache, list) and len(cache) in (2, 3):
            cache[:] = [None] * len(cache)


class AdditionalNetworks(scripts.Script):
    def title(self):
        return panel.TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        ui = panel.build_panel(is_img2img, int(opt("lora_ext_slots")), LIBRARY.names, info_line, LIBRARY.find)
        self.infotext_fields = ui.infotext_fields
        self.paste_field_names = ui.paste_field_names
        return ui.states

    def process(self, p, *slot_args):
        slots, problems = slotlib.from_args(slot_args, getattr(p, "lora_ext_overrides", {}))
        runtime = Runtime.get()
        try:
            outcome = runtime.run(Runtime.host(shared.sd_model), slots, mode=opt("lora_ext_mode"))
        except UnsupportedModel as e:       # a model of a family we do not apply to (Forge's Flux ...)
            if any(slot.active for slot in slots):
                message = f"Additional Networks: slots skipped: {e}"
                print(message)
                p.comments[message] = 1
                p.extra_generation_params["AddNet Warning"] = str(e)
            return
        if runtime.text_encoder_edits != Runtime.edits_seen:
            # ours changed since the last generation (here, a training run, a bake or a model load)
            forget_conditioning(p)
            Runtime.edits_seen = runtime.text_encoder_edits
        p.extra_generation_params.update(outcome.infotext)
        if problems:
            said = outcome.infotext.get("AddNet Warning")
            p.extra_generation_params["AddNet Warning"] = "; ".join(problems + ([said] if said else []))
        for message in [f"Additional Networks: {m}" for m in problems] + outcome.messages:
            print(message)
            p.comments[message] = 1

    # Forge merges weights itself: the LoRAs `process` staged go onto its objects where it reads them (the
    # hooks below run in Forge only, or find no patch system and do nothing)

    def process_batch(self, p, *args, **kwargs):
        """Before the conditioning is computed: our text-encoder patches."""
        patches = forge_patches(p)
        if patches is not None:
            patches.install("clip")

    def process_before_every_sampling(self, p, *args, **kwargs):
        """Forge, before each sampling pass: our UNet patches."""
        patches = forge_patches(p)
        if patches is not None:
            patches.install("unet", scheduled=Runtime.get().scheduled)

    def postprocess(self, p, processed, *args):
        """Forge: its weights merged again without ours, as its built-in left them."""
        patches = forge_patches(p)
        if patches is not None:
            patches.release()


def forge_patches(p):
    """The host's patch system (Forge's) when the panel applies anything there, else None."""
    if Runtime._instance is None or Runtime._host is None or Runtime._for is not p.sd_model:
        return None
    return Runtime._host.patcher
