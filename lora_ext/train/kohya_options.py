"""Every option of kohya's `train_network.py` (sd-scripts v0.10.1: 193) and what lora_ext does with it.

An option is one of:
- a `TrainConfig` field: it means what it means in kohya;
- an alias (`ALIASES`): an old spelling kohya still takes, turned into the option it stands for;
- `NO_EFFECT`: accepted, with one line saying why it changes nothing here;
- `NEEDS`: meaningful only beside another option; while that one is at kohya's default it changes nothing,
  so any value is accepted silently (the kohya_ss GUI writes these into every configuration it saves);
- `REFUSED`: not done by lora_ext; given at kohya's default it is accepted (it asks for nothing), otherwise the
  message says why and what to use instead;
- anything else is not a kohya option: "unknown option".
The defaults below are kohya's, read off its argument parser (tests/test_kohya_options.py checks the table
against a checkout of sd-scripts where one is given)."""
from __future__ import annotations

KOHYA_VERSION = "sd-scripts v0.10.1"
# kohya's optimizer_type names (train_util.get_optimizer; train.optim builds them), and torch's SGD
OPTIMIZER_NAMES = ("AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
                   "PagedLion8bit", "SGDNesterov", "SGDNesterov8bit", "DAdaptation", "DAdaptAdamPreprint",
                   "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Adafactor",
                   "Prodigy", "SGD")

KOHYA_DEFAULTS = {
    'console_log_level': None, 'console_log_file': None, 'console_log_simple': False, 'v2': False,
    'v_parameterization': False, 'pretrained_model_name_or_path': None, 'tokenizer_cache_dir': None,
    'metadata_title': None, 'metadata_author': None, 'metadata_description': None, 'metadata_license': None,
    'metadata_tags': None, 'metadata_usage_hint': None, 'metadata_thumbnail': None, 'metadata_merged_from': None,
    'metadata_trigger_phrase': None, 'metadata_preprocessor': None, 'metadata_is_negative_embedding': None,
    'train_data_dir': None, 'cache_info': False, 'shuffle_caption': False, 'caption_separator': ',',
    'caption_extension': '.caption', 'caption_extention': None, 'keep_tokens': 0, 'keep_tokens_separator': '',
    'secondary_separator': None, 'enable_wildcard': False, 'caption_prefix': None, 'caption_suffix': None,
    'color_aug': False, 'flip_aug': False, 'face_crop_aug_range': None, 'random_crop': False, 'debug_dataset': False,
    'resolution': None, 'cache_latents': False, 'vae_batch_size': 1, 'cache_latents_to_disk': False,
    'skip_cache_check': False, 'enable_bucket': False, 'min_bucket_reso': 256, 'max_bucket_reso': 1024,
    'bucket_reso_steps': 64, 'bucket_no_upscale': False, 'resize_interpolation': None, 'token_warmup_min': 1,
    'token_warmup_step': 0, 'alpha_mask': False, 'dataset_class': None, 'caption_dropout_rate': 0.0,
    'caption_dropout_every_n_epochs': 0, 'caption_tag_dropout_rate': 0.0, 'reg_data_dir': None, 'in_json': None,
    'dataset_repeats': 1, 'output_dir': None, 'output_name': None, 'huggingface_repo_id': None,
    'huggingface_repo_type': None, 'huggingface_path_in_repo': None, 'huggingface_token': None,
    'huggingface_repo_visibility': None, 'save_state_to_huggingface': False, 'resume_from_huggingface': False,
    'async_upload': False, 'save_precision': None, 'save_every_n_epochs': None, 'save_every_n_steps': None,
    'save_n_epoch_ratio': None, 'save_last_n_epochs': None, 'save_last_n_epochs_state': None,
    'save_last_n_steps': None, 'save_last_n_steps_state': None, 'save_state': False,
    'save_state_on_train_end': False, 'resume': None, 'train_batch_size': 1, 'max_token_length': None,
    'mem_eff_attn': False, 'torch_compile': False, 'dynamo_backend': 'inductor', 'xformers': False, 'sdpa': False,
    'vae': None, 'max_train_steps': 1600, 'max_train_epochs': None, 'max_data_loader_n_workers': 8,
    'persistent_data_loader_workers': False, 'seed': None, 'gradient_checkpointing': False,
    'gradient_accumulation_steps': 1, 'mixed_precision': 'no', 'full_fp16': False, 'full_bf16': False,
    'fp8_base': False, 'ddp_timeout': None, 'ddp_gradient_as_bucket_view': False, 'ddp_static_graph': False,
    'clip_skip': None, 'logging_dir': None, 'log_with': None, 'log_prefix': None, 'log_tracker_name': None,
    'wandb_run_name': None, 'log_tracker_config': None, 'wandb_api_key': None, 'log_config': False,
    'noise_offset': None, 'noise_offset_random_strength': False, 'multires_noise_iterations': None,
    'ip_noise_gamma': None, 'ip_noise_gamma_random_strength': False, 'multires_noise_discount': 0.3,
    'adaptive_noise_scale': None, 'zero_terminal_snr': False, 'min_timestep': None, 'max_timestep': None,
    'loss_type': 'l2', 'huber_schedule': 'snr', 'huber_c': 0.1, 'huber_scale': 1.0, 'lowram': False,
    'highvram': False, 'sample_every_n_steps': None, 'sample_at_first': False, 'sample_every_n_epochs': None,
    'sample_prompts': None, 'sample_sampler': 'ddim', 'config_file': None, 'output_config': False,
    'prior_loss_weight': 1.0, 'conditioning_data_dir': None, 'masked_loss': False, 'deepspeed': False,
    'zero_stage': 2, 'offload_optimizer_device': None, 'offload_optimizer_nvme_path': None,
    'offload_param_device': None, 'offload_param_nvme_path': None, 'zero3_init_flag': False,
    'zero3_save_16bit_model': False, 'fp16_master_weights_and_gradients': False, 'optimizer_type': '',
    'use_8bit_adam': False, 'use_lion_optimizer': False, 'learning_rate': 2e-06, 'max_grad_norm': 1.0,
    'optimizer_args': None, 'lr_scheduler_type': '', 'lr_scheduler_args': None, 'lr_scheduler': 'constant',
    'lr_warmup_steps': 0, 'lr_decay_steps': 0, 'lr_scheduler_num_cycles': 1, 'lr_scheduler_power': 1,
    'fused_backward_pass': False, 'lr_scheduler_timescale': None, 'lr_scheduler_min_lr_ratio': None,
    'dataset_config': None, 'min_snr_gamma': None, 'scale_v_pred_loss_like_noise_pred': False,
    'v_pred_like_loss': None, 'debiased_estimation_loss': False, 'weighted_captions': False,
    'cpu_offload_checkpointing': False, 'no_metadata': False, 'save_model_as': 'safetensors', 'unet_lr': None,
    'text_encoder_lr': None, 'fp8_base_unet': False, 'network_weights': None, 'network_module': None,
    'network_dim': None, 'network_alpha': 1, 'network_dropout': None, 'network_args': None,
    'network_train_unet_only': False, 'network_train_text_encoder_only': False, 'training_comment': None,
    'dim_from_weights': False, 'scale_weight_norms': None, 'base_weights': None, 'base_weights_multiplier': None,
    'no_half_vae': False, 'skip_until_initial_step': False, 'initial_epoch': None, 'initial_step': None,
    'validation_seed': None, 'validation_split': 0.0, 'validate_every_n_steps': None,
    'validate_every_n_epochs': None, 'max_validation_steps': None,
}

# old spellings kohya still takes: (the option, the value it stands for; None: the value given)
ALIASES = {
    "caption_extention": ("caption_extension", None),
    "use_8bit_adam": ("optimizer_type", "AdamW8bit"),
    "use_lion_optimizer": ("optimizer_type", "Lion"),
}

# options that change nothing here whatever their value: accepted, with one line saying why ("" : silently)
NO_EFFECT = {
    "max_data_loader_n_workers": "images are loaded in the training process; there are no loader workers",
    "persistent_data_loader_workers": "there are no loader workers",
    "tokenizer_cache_dir": "the tokenizer comes with the model (the checkpoint's config), nothing is downloaded",
    "lowram": "the checkpoint is read tensor by tensor already",
    "highvram": "the VAE leaves the device when all latents are cached, whatever this says",
    "mem_eff_attn": "torch's scaled_dot_product_attention is used (memory-efficient already)",
    "log_prefix": "TensorBoard logs go to logging_dir as they are",
    "config_file": "", "console_log_level": "", "console_log_file": "", "console_log_simple": "",
    "cache_info": "the dataset scan reads image sizes each run (a header read per image); there is no scan cache",
    "skip_cache_check": "cached latents are checked by a stamp of their image, which costs nothing to read",
    "vae_batch_size": "latents are encoded batch by batch as the run first needs them",
    "ddp_timeout": "several GPUs train through torchrun's own process group and its timeout",
    "ddp_gradient_as_bucket_view": "gradients are all-reduced in lora_ext's own buckets",
    "ddp_static_graph": "gradients are all-reduced in lora_ext's own buckets",
    "torch_compile": "torch.compile is not applied (it changes speed only, not the result)",
    "cpu_offload_checkpointing": "checkpointed blocks keep their inputs on the device (it changes memory only)",
    "fused_backward_pass": "the optimizer steps after the backward pass (it changes memory only)",
    "sample_sampler": "previews are drawn with DDIM whatever sampler is named",
    "save_last_n_epochs_state": "lora_ext keeps one resumable state, the latest (a resume needs no other)",
    "save_last_n_steps_state": "lora_ext keeps one resumable state, the latest (a resume needs no other)",
}

# options that mean something only beside another one (kohya reads them only then): while that one is at
# kohya's default they change nothing, whatever their value
NEEDS = {
    "dynamo_backend": "torch_compile",
    "wandb_run_name": "log_with", "wandb_api_key": "log_with", "log_tracker_name": "log_with",
    "log_tracker_config": "log_with", "log_config": "log_with",
    "huggingface_repo_type": "huggingface_repo_id", "huggingface_path_in_repo": "huggingface_repo_id",
    "huggingface_token": "huggingface_repo_id", "huggingface_repo_visibility": "huggingface_repo_id",
    "save_state_to_huggingface": "huggingface_repo_id", "async_upload": "huggingface_repo_id",
    "zero_stage": "deepspeed", "offload_optimizer_device": "deepspeed", "offload_optimizer_nvme_path": "deepspeed",
    "offload_param_device": "deepspeed", "offload_param_nvme_path": "deepspeed", "zero3_init_flag": "deepspeed",
    "zero3_save_16bit_model": "deepspeed", "fp16_master_weights_and_gradients": "deepspeed",
    "dataset_repeats": "in_json",
    "validation_seed": "validation_split", "validate_every_n_steps": "validation_split",
    "validate_every_n_epochs": "validation_split", "max_validation_steps": "validation_split",
    "conditioning_data_dir": "masked_loss",
    "skip_until_initial_step": "initial_step",
}

_NOT_YET = "lora_ext does not do this yet"
_NEXT = "comes with lora_ext's validation and masked-loss release"
# options lora_ext does not do: given at kohya's default they are accepted; otherwise this says why
REFUSED = {
    # makes no sense in this product
    "deepspeed": "DeepSpeed is not used: lora_ext trains on one GPU, or on several with torchrun (DDP)",
    "huggingface_repo_id": "lora_ext does not upload anywhere: upload the saved file yourself",
    "resume_from_huggingface": "lora_ext does not download: resume from a local state folder (--resume)",
    "dataset_class": "lora_ext loads no Python class named in a configuration: give folders (train_data_dir)",
    "in_json": "fine-tuning metadata (in_json) is not a LoRA dataset: give image folders with caption files",
    "debug_dataset": "use the LoRA tab's Check dataset, which lists images, captions and buckets without training",
    # coming with the next release (validation loss, masked loss)
    **{n: _NEXT for n in ("validation_split", "masked_loss", "alpha_mask")},
    # not done yet
    **{n: _NOT_YET for n in (
        "weighted_captions", "face_crop_aug_range",
        "initial_epoch", "initial_step", "fp8_base",
        "fp8_base_unet", "full_fp16", "full_bf16")},
}


def at_default(name: str, value) -> bool:
    """Whether `value` asks for what kohya's default does: the default itself (in any spelling: "0.1" for 0.1,
    "L2" for "l2"), or, where the default is "off" (None, False, 0, ""), any value kohya reads as off (it tests
    these options for truth)."""
    default = KOHYA_DEFAULTS.get(name)
    if _same(value, default):
        return True
    return _off(default) and _off(value)


def _same(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().lower() == b.strip().lower()
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def _off(value) -> bool:
    if value is None or value is False:
        return True
    if isinstance(value, str):
        return value.strip().lower() in ("", "false", "0", "0.0", "none")
    if isinstance(value, (list, tuple, dict)):
        return len(value) == 0
    return isinstance(value, (int, float)) and value == 0


def resolve_aliases(given: dict) -> tuple[dict, list]:
    """`given` with kohya's old spellings turned into the options they stand for, and the problems (an alias
    and its option both asking for something)."""
    out, problems = dict(given), []
    for alias, (option, value) in ALIASES.items():
        if alias not in out:
            continue
        raw = out.pop(alias)
        if at_default(alias, raw):
            continue
        wanted = raw if value is None else value
        if option in out and not at_default(option, out[option]) and not _same(out[option], wanted):
            problems.append(f"{alias} asks for {option} = {wanted!r} and {option} is {out[option]!r}: give one")
            continue
        out[option] = wanted
    return out, problems


def check(given: dict, fields: set) -> tuple[list, list]:
    """(problems, notes) of the options `given` beyond lora_ext's own `fields`: kohya options we do not do
    that ask for something, names that are no option at all; the options accepted without effect."""
    problems, notes, unknown = [], [], []
    for name, value in given.items():
        if name in fields:
            continue
        if name in NO_EFFECT:
            if NO_EFFECT[name] and not at_default(name, value):
                notes.append(f"note: --{name} has no effect here: {NO_EFFECT[name]}")
            continue
        controller = NEEDS.get(name)
        if controller is not None and at_default(controller, given.get(controller)):
            continue            # meaningless without its controller, which asks for nothing
        if name in REFUSED:
            if not at_default(name, value):
                problems.append(f"{name}: {REFUSED[name]} (kohya's default, {KOHYA_DEFAULTS[name]!r}, is accepted)")
        elif name not in KOHYA_DEFAULTS:
            unknown.append(name)
    if unknown:
        problems.append(f"unknown options: {', '.join(sorted(unknown))} (neither lora_ext's nor kohya's "
                        f"train_network.py's, {KOHYA_VERSION})")
    return problems, notes


def status(name: str) -> str:
    """What lora_ext does with kohya's option `name` (not one of its own fields), for --help."""
    if name in ALIASES:
        option, value = ALIASES[name]
        return f"kohya's old spelling of --{option}" + (f" {value}" if value else "")
    if name in NO_EFFECT:
        return "no effect here" + (f": {NO_EFFECT[name]}" if NO_EFFECT[name] else "")
    if name in REFUSED:
        return f"{REFUSED[name]}; accepted at kohya's default ({KOHYA_DEFAULTS[name]!r})"
    return f"read only beside --{NEEDS[name]}"
