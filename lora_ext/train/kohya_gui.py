"""The kohya_ss GUI's saved configurations and shared presets (its LoRA tab's JSON): turned into kohya's
options as the GUI turns them into sd-scripts' command line (kohya_gui/lora_gui.py, train_model), with one
line for each field not taken and why.

The GUI writes every field of its form, nearly all at their defaults; what it sends to sd-scripts differs in
places from the JSON: `max_resolution` is `resolution`, `optimizer` is `optimizer_type`, `LoRA_type` picks the
network module and its `network_args` from a dozen fields, `lr_warmup` is a percentage, a learning rate of 0
for the text encoder (or the UNet) trains only the other, 0 and "" mean "not given", and `epoch` is the run's
length unless max_train_steps is given."""
from __future__ import annotations

import json
import shlex

from . import kohya_options


class GuiConfigError(ValueError):
    """A file that is no kohya_ss GUI configuration."""


# the GUI's name -> kohya's
RENAMED = {"max_resolution": "resolution", "optimizer": "optimizer_type", "lora_network_weights": "network_weights"}
# LoRA_type -> (network_module, LyCORIS algo or None, the GUI fields it turns into network_args)
_LYCO = ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout", "use_scalar",
         "rank_dropout_scale", "train_norm", "bypass_mode", "dora_wd")
_KOHYA_BLOCKS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                 "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
LORA_TYPES = {
    "Standard": ("networks.lora", None, _KOHYA_BLOCKS),
    "Kohya LoCon": ("networks.lora", None, ("conv_dim", "conv_alpha") + _KOHYA_BLOCKS),
    "LoCon": ("lycoris.kohya", "locon", _LYCO),
    "LyCORIS/LoCon": ("lycoris.kohya", "locon", _LYCO),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha", _LYCO),
    "LyCORIS/LoKr": ("lycoris.kohya", "lokr", _LYCO + ("factor", "use_cp", "decompose_both")),
    "LyCORIS/iA3": ("lycoris.kohya", "ia3", ("conv_dim", "conv_alpha", "train_on_input")),
    "LyCORIS/GLoRA": ("lycoris.kohya", "glora", ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout",
                                                  "module_dropout", "rank_dropout_scale", "train_norm")),
    "LyCORIS/BOFT": ("lycoris.kohya", "boft", _LYCO[:-2]),
    "LyCORIS/Diag-OFT": ("lycoris.kohya", "diag-oft", _LYCO[:-2] + ("constrain", "rescaled")),
    "LyCORIS/DyLoRA": ("lycoris.kohya", "dylora", ("conv_dim", "conv_alpha", "use_tucker", "unit", "rank_dropout",
                                                    "module_dropout", "train_norm")),
    "LyCORIS/Native Fine-Tuning": ("lycoris.kohya", "full", ("rank_dropout", "module_dropout",
                                                             "rank_dropout_scale", "train_norm")),
}
# every field some LoRA_type turns into network_args: the others' are not read for this type (nor by the GUI)
_NETWORK_FIELDS = {f for _, _, fields in LORA_TYPES.values() for f in fields} | {"LyCORIS_preset"}
# the GUI's field names that sd-scripts takes under another name in network_args
_ARG_NAME = {"unit": "block_size", "constrain": "constraint"}
# fields of the GUI that are not sd-scripts options, and why nothing here takes them
GUI_ONLY = {
    **{k: "a setting of accelerate's launcher: lora_ext trains in its own process (torchrun for several GPUs)"
       for k in ("num_cpu_threads_per_process", "num_processes", "num_machines", "multi_gpu", "gpu_ids",
                 "main_process_port", "extra_accelerate_launch_args", "dynamo_mode", "dynamo_use_fullgraph",
                 "dynamo_use_dynamic")},
    **{k: "" for k in ("model_list", "save_as_bool", "training_preset", "sdxl_checkbox", "v_pred_like_loss_checkbox",
                       "print_only", "noise_offset_type", "sample_every_n_steps_checkbox")},
    "sdxl": "",             # the model's family is read from the checkpoint
    "stop_text_encoder_training": "DreamBooth's (train_db.py): train_network.py does not read it",
    "no_token_padding": "DreamBooth's (train_db.py): train_network.py does not read it",
    "use_wandb": "lora_ext logs to TensorBoard (logging_dir)",
}
_SDXL_ONLY = {"sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs", "sdxl_no_half_vae": "no_half_vae"}
# fields of other model families' tabs (Flux, SD3, ...) and the GUI's newer extras: meaningless for SD1/SD2/SDXL
_PREFIXES_OF_OTHER_MODELS = ("flux1_", "sd3_", "t5xxl", "clip_g", "clip_l", "hunyuan_", "anima_", "lumina_",
                             "ae", "split_", "blocks_to_swap", "single_blocks_to_swap", "double_blocks_to_swap",
                             "guidance_scale", "discrete_flow_shift", "model_prediction_type", "timestep_sampling",
                             "apply_t5_attn_mask", "mem_eff_save", "loraplus_", "img_", "txt_", "single_dim",
                             "single_mod_dim", "in_dims", "train_double_block_indices",
                             "train_single_block_indices", "enable_all_linear", "train_lora_ggpo", "ggpo_",
                             "train_blocks", "train_t5xxl", "model_type", "weighting_scheme", "logit_",
                             "mode_scale", "pos_emb_random_crop_rate", "save_clip", "save_t5xxl", "t5_dropout_rate",
                             "text_encoder_batch_size", "enable_scaled_pos_embed", "factor", "train_on_input")


def is_gui_config(data) -> bool:
    """Whether a parsed JSON is the GUI's (its LoRA tab writes LoRA_type, or max_resolution and optimizer)."""
    return isinstance(data, dict) and ("LoRA_type" in data or {"max_resolution", "optimizer"} <= set(data))


def read(text: str) -> tuple[dict, list]:
    """(kohya's options, notes: a line per field not taken and why) of a GUI JSON's text."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise GuiConfigError(f"not valid JSON ({e})") from None
    if not is_gui_config(data):
        raise GuiConfigError("not a kohya_ss GUI LoRA configuration (it has no LoRA_type, nor max_resolution "
                             "and optimizer)")
    return options(data)


def _given(value) -> bool:
    """The GUI sends a field only when it is not "", False or None (and numbers only when not 0)."""
    return value not in ("", None, False) and not (_number(value) == 0 and not isinstance(value, bool))


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def options(data: dict) -> tuple[dict, list]:
    out, notes, used = {}, [], set()

    def take(name, value, field=None):
        out[name] = value
        used.add(field or name)

    lora_type = data.get("LoRA_type", "Standard")
    module = LORA_TYPES.get(lora_type)
    if module is None:
        notes.append(f"LoRA_type {lora_type!r} is not one lora_ext trains (it trains {', '.join(LORA_TYPES)}): "
                     "the network is kohya's LoRA")
        module = LORA_TYPES["Standard"]
    used.update(_NETWORK_FIELDS | {"LoRA_type"})
    name, algo, arg_fields = module
    args = [f"algo={algo}"] if algo else []
    if algo:
        args.insert(0, f"preset={data.get('LyCORIS_preset') or 'full'}")
    for field in arg_fields:
        value = data.get(field)
        used.add(field)
        if value is None or value == "" or (algo is None and not _given(value)):
            continue
        args.append(f"{_ARG_NAME.get(field, field)}={value}")
    take("network_module", name, "network_module")
    take("network_args", args, "network_args")
    _rates(data, take, notes, used)
    _length(data, take, notes, used)
    if "xformers" in data:
        mode = data["xformers"]
        used.add("xformers")
        if mode is True or mode == "xformers":
            take("xformers", True, "xformers")
        elif mode == "sdpa":
            take("sdpa", True, "xformers")
    sdxl = bool(data.get("sdxl"))
    for field, option in _SDXL_ONLY.items():
        if field in data:
            used.add(field)
            if sdxl and data[field]:
                take(option, True, field)
    if data.get("noise_offset_type", "Original") == "Multires":
        used.update(("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"))
    else:
        used.update(("multires_noise_iterations", "multires_noise_discount"))
    if "additional_parameters" in data:
        used.add("additional_parameters")
        extra, extra_notes = _command_line(str(data["additional_parameters"] or ""))
        out.update(extra)
        notes += extra_notes
    for field, value in data.items():
        if field in used:
            continue
        option = RENAMED.get(field, field)
        if option in kohya_options.KOHYA_DEFAULTS:
            if _given(value):
                take(option, _list_or(option, value), field)
            continue
        if field in GUI_ONLY:
            if _given(value) and GUI_ONLY[field]:
                notes.append(f"{field}: not taken: {GUI_ONLY[field]}")
        elif field.startswith(_PREFIXES_OF_OTHER_MODELS):
            if _given(value):
                notes.append(f"{field}: not taken: another model family's, or a GUI option sd-scripts for "
                             "SD1/SD2/SDXL does not read")
        elif _given(value):
            notes.append(f"{field}: not taken: not a field of the kohya_ss GUI's LoRA tab lora_ext knows")
    return out, notes


def _list_or(option: str, value):
    """Fields the GUI sends as a list of words (optimizer_args, lr_scheduler_args)."""
    if option in ("optimizer_args", "lr_scheduler_args") and isinstance(value, str):
        return value.replace('"', "").split()
    return value


def _rates(data: dict, take, notes: list, used: set) -> None:
    """The GUI's learning rates: 0 or "" for the text encoder trains the UNet only, and the reverse."""
    lr, te, unet = (_number(data.get(k)) or 0.0 for k in ("learning_rate", "text_encoder_lr", "unet_lr"))
    used.update(("learning_rate", "text_encoder_lr", "unet_lr"))
    if "learning_rate" in data:
        take("learning_rate", lr, "learning_rate")
    if "text_encoder_lr" not in data and "unet_lr" not in data:
        return
    if te:
        take("text_encoder_lr", te, "text_encoder_lr")
    if unet:
        take("unet_lr", unet, "unet_lr")
    if te == 0 and unet != 0:
        take("network_train_unet_only", True, "text_encoder_lr")
    elif unet == 0 and te != 0:
        take("network_train_text_encoder_only", True, "unet_lr")


def _length(data: dict, take, notes: list, used: set) -> None:
    """The run's length: max_train_epochs when given, else max_train_steps when given, else `epoch` epochs
    (the GUI counts the steps of that many epochs); warm-up as its percentage unless steps are given."""
    used.update(("epoch", "max_train_epochs", "max_train_steps", "lr_warmup", "lr_warmup_steps",
                 "lr_scheduler_num_cycles", "seed"))
    epochs, steps, epoch = (int(_number(data.get(k)) or 0) for k in ("max_train_epochs", "max_train_steps", "epoch"))
    if epochs:
        take("max_train_epochs", epochs)
    elif steps:
        take("max_train_steps", steps)
    elif epoch:
        take("max_train_epochs", epoch, "epoch")
    warmup_steps, warmup_share = _number(data.get("lr_warmup_steps")) or 0, _number(data.get("lr_warmup")) or 0
    if warmup_steps > 0:
        take("lr_warmup_steps", int(warmup_steps))
    elif warmup_share:
        take("lr_warmup_steps", warmup_share / 100, "lr_warmup")
    cycles = data.get("lr_scheduler_num_cycles")
    take("lr_scheduler_num_cycles", int(_number(cycles)) if _number(cycles) else max(epoch, 1))
    seed = int(_number(data.get("seed")) or 0)
    if seed:
        take("seed", seed)
    elif "seed" in data:
        notes.append("seed: 0 asks kohya for a random seed; lora_ext's default is 42, so that a run repeats")


def _command_line(text: str) -> tuple[dict, list]:
    """The GUI's "additional parameters": more of sd-scripts' command line (--name value ...)."""
    out, notes, name = {}, [], None
    try:
        words = shlex.split(text)
    except ValueError as e:
        return {}, [f"additional_parameters: not taken: {e}"]
    for word in words:
        if word.startswith("--"):
            name, given, value = word[2:].partition("=")
            name = name.replace("-", "_")
            out[name] = value if given else True
        elif name is None:
            notes.append(f"additional_parameters: {word!r} not taken: it follows no --option")
        elif out[name] is True:
            out[name] = word
        else:
            out[name] = (out[name] if isinstance(out[name], list) else [out[name]]) + [word]
    return out, notes
