"""Training options, with the names and meanings of kohya's train_network.py, so the command lines and TOML
configs users already have run unchanged. An option kohya has but we do not is named in a clear error,
never silently ignored; so is a name nobody has."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    # model & output
    pretrained_model_name_or_path: str = ""
    v2: bool = False
    v_parameterization: bool = False
    output_dir: str = "output"
    output_name: str = "last"
    save_model_as: str = "safetensors"
    save_precision: str = "fp16"
    save_every_n_epochs: int = 0
    save_every_n_steps: int = 0
    save_state: bool = False
    resume: str = ""                # a state folder (<name>-state/) a cancel, crash or save_state left
    state_dir: str = ""             # lora_ext's own: where states go (default output_dir; the webui keeps them
                                    # out of models/Lora, whose lists would offer them as LoRAs)
    network_weights: str = ""
    training_comment: str = ""
    # dataset
    train_data_dir: str = ""
    reg_data_dir: str = ""
    caption_extension: str = ".txt"
    resolution: str = "512"
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    random_crop: bool = False
    flip_aug: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    prior_loss_weight: float = 1.0
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    # schedule
    train_batch_size: int = 1
    max_train_steps: int = 0
    max_train_epochs: int = 10
    gradient_accumulation_steps: int = 1
    seed: int = 42
    # network
    network_module: str = "networks.lora"
    network_dim: int = 128
    network_alpha: float = 1.0
    network_dropout: float = 0.0
    network_args: list = field(default_factory=list)      # "conv_dim=4", "conv_alpha=1", "rank_dropout=0.1", ...
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    # optimizer
    optimizer_type: str = "AdamW"
    optimizer_args: list = field(default_factory=list)
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    lr_scheduler: str = "cosine_with_restarts"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0
    # text
    clip_skip: int = 1
    max_token_length: int = 75
    # precision & memory
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = False
    xformers: bool = False
    sdpa: bool = False
    # loss
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    # samples & logging
    sample_every_n_steps: int = 0
    sample_every_n_epochs: int = 0
    sample_prompts: list = field(default_factory=list)
    sample_steps: int = 20
    logging_dir: str = ""

    # --- derived ----------------------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        parts = [int(x) for x in str(self.resolution).replace("x", ",").split(",") if x.strip()]
        return (parts[0], parts[-1])

    @property
    def net_args(self) -> dict:
        out = {}
        for a in self.network_args:
            k, sep, v = str(a).partition("=")
            if not sep:
                raise ConfigError(f"network_args entry {a!r} is not key=value")
            out[k.strip()] = v.strip()
        return out

    def lrs(self) -> tuple[float, float]:
        """(UNet lr, text encoder lr): each defaults to learning_rate; 0 means that part is not trained."""
        unet = self.learning_rate if self.unet_lr is None else self.unet_lr
        te = self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr
        if self.network_train_unet_only:
            te = 0.0
        if self.network_train_text_encoder_only:
            unet = 0.0
        return unet, te

    def validate(self) -> None:
        problems = []
        if self.max_token_length not in (75, 150, 225):
            problems.append(f"max_token_length must be 75, 150 or 225, not {self.max_token_length}")
        if self.clip_skip < 1:
            problems.append("clip_skip counts from 1 (1 = the last layer)")
        for name in ("mixed_precision", "save_precision"):
            if getattr(self, name) not in ("fp16", "bf16", "fp32", "no", "float", "float16", "bfloat16"):
                problems.append(f"{name} must be fp16, bf16 or fp32")
        if self.network_module not in ("networks.lora", "lora"):
            problems.append(f"network_module {self.network_module!r}: lora_ext trains networks.lora (LoRA/LoCon)")
        if self.save_model_as != "safetensors":
            problems.append("save_model_as: lora_ext saves safetensors")
        unknown = set(self.net_args) - {"conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "dropout"}
        if unknown:
            problems.append(f"network_args not supported: {', '.join(sorted(unknown))}")
        if self.network_dim < 1:
            problems.append("network_dim must be at least 1")
        if self.random_crop and self.cache_latents:
            problems.append("random_crop needs the VAE at every step: turn off cache_latents or random_crop")
        if problems:
            raise ConfigError("; ".join(problems))


# kohya options we know and do not support: named in the error instead of "unknown option"
KOHYA_UNSUPPORTED = {
    "deepspeed", "fp8_base", "full_fp16", "full_bf16", "color_aug", "face_crop_aug_range", "token_warmup_min",
    "multires_noise_iterations", "multires_noise_discount", "adaptive_noise_scale", "zero_terminal_snr",
    "scale_weight_norms", "ip_noise_gamma", "debiased_estimation_loss", "masked_loss", "loss_type",
    "huber_schedule", "huber_c", "dataset_config", "in_json", "mem_eff_attn", "lowram", "highvram",
    "vae", "tokenizer_cache_dir", "no_half_vae", "persistent_data_loader_workers", "max_data_loader_n_workers",
    "log_with", "log_prefix", "wandb_api_key", "huggingface_repo_id", "save_last_n_epochs", "save_n_epoch_ratio",
    "dim_from_weights", "base_weights", "network_train_unet_only_with_te_lr", "lr_scheduler_type",
    "lr_scheduler_args", "caption_prefix", "caption_suffix", "caption_tag_dropout_rate",
    "caption_dropout_every_n_epochs", "weighted_captions", "sample_sampler", "output_config",
}
IGNORED_HARMLESS = {"config_file", "console_log_level", "console_log_file", "console_log_simple"}


def from_dict(values: dict, source: str = "options") -> TrainConfig:
    """A TrainConfig from a flat dict (kohya's TOML may nest options in tables: those are flattened)."""
    flat = {}
    for k, v in values.items():
        if isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    names = {f.name: f for f in fields(TrainConfig)}
    bad_kohya = sorted(k for k in flat if k in KOHYA_UNSUPPORTED)
    unknown = sorted(k for k in flat if k not in names and k not in KOHYA_UNSUPPORTED and k not in IGNORED_HARMLESS)
    if bad_kohya or unknown:
        msg = []
        if bad_kohya:
            msg.append(f"kohya options lora_ext does not support: {', '.join(bad_kohya)}")
        if unknown:
            msg.append(f"unknown options: {', '.join(unknown)}")
        raise ConfigError(f"{source}: " + "; ".join(msg))
    cfg = TrainConfig()
    for k, v in flat.items():
        if k in IGNORED_HARMLESS:
            continue
        if k in ("network_args", "optimizer_args", "sample_prompts") and isinstance(v, str):
            v = v.split() if k != "sample_prompts" else [p for p in v.split("\n") if p.strip()]
        if k == "resolution" and isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        setattr(cfg, k, _coerce(names[k], v, source))
    cfg.validate()
    return cfg


def _coerce(f: dataclasses.Field, v, source):
    kind = type(f.default) if f.default is not dataclasses.MISSING and f.default is not None else None
    if f.name in ("unet_lr", "text_encoder_lr"):
        return None if v in (None, "") else float(v)
    try:
        if kind is bool and isinstance(v, str):
            return v.lower() in ("1", "true", "yes", "on")
        if kind in (int, float) and not isinstance(v, bool):
            return kind(float(v)) if kind is int else float(v)
    except ValueError:
        raise ConfigError(f"{source}: {f.name} = {v!r} is not a number") from None
    return v


def field_names() -> set:
    return {f.name for f in fields(TrainConfig)}


def load_toml(path: str) -> TrainConfig:
    return from_dict(load_toml_dict(path), path)


def load_toml_dict(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:       # Python 3.10 (the webui's): install.py provides tomli
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return data


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML that load_toml (and kohya's --config_file) reads back."""
    import json

    lines = []
    for f in fields(TrainConfig):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        lines.append(f"{f.name} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    return "\n".join(lines) + "\n"
