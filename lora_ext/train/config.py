"""Training options, with the names, meanings and defaults of kohya's train_network.py, so the command lines
and TOML configs users already have run unchanged and mean the same. An option kohya has that would change
the result here is named in a clear error, never silently ignored; one that means nothing here (worker
counts, caches, VRAM modes) is accepted with a one-line note; a name nobody has is an error. The guide's
starting values (GUIDE_DEFAULTS) belong to the training tab."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields

from ..weights import flag_value, number, out_of_range
from . import kohya_options


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
    overwrite: bool = False         # lora_ext's own: replace an existing <output_name>.safetensors
    save_model_as: str = "safetensors"
    save_precision: str = "fp32"       # kohya: none given = as trained (fp32)
    save_every_n_epochs: int = 0
    save_every_n_steps: int = 0
    save_state: bool = False
    save_state_on_train_end: bool = False   # kohya's: a state at the end of the run only
    save_n_epoch_ratio: int = 0     # kohya's: about this many numbered saves in the run (save_every_n_epochs from it)
    save_last_n_epochs: int = 0     # kohya's: keep the numbered saves of the last N x save_every_n_epochs epochs
    save_last_n_steps: int = 0      # kohya's: keep the numbered saves of the last N steps
    no_metadata: bool = False       # kohya's: only the network's own keys (and the model spec) in the files
    output_config: bool = False     # kohya's: the options given are written to config_file instead of training
    resume: str = ""                # a state folder (<name>-state/) a cancel, crash or save_state left
    state_dir: str = ""             # lora_ext's own: where states go (default output_dir; the webui keeps them
                                    # out of models/Lora, whose lists would offer them as LoRAs)
    network_weights: str = ""
    training_comment: str = ""
    # the model spec's own fields in each saved file (kohya's --metadata_*: modelspec.<name>; the title
    # defaults to output_name, the thumbnail is a data URL or an image file turned into one)
    metadata_title: str = ""
    metadata_author: str = ""
    metadata_description: str = ""
    metadata_license: str = ""
    metadata_tags: str = ""
    metadata_usage_hint: str = ""
    metadata_thumbnail: str = ""
    metadata_merged_from: str = ""
    metadata_trigger_phrase: str = ""
    metadata_preprocessor: str = ""
    metadata_is_negative_embedding: str = ""
    # dataset
    train_data_dir: str = ""
    reg_data_dir: str = ""
    caption_extension: str = ".caption"
    dataset_config: str = ""        # kohya's dataset TOML: its subsets replace the two folders (train.dataset_config)
    resolution: str = "512"
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False     # kohya's: each image's bucket from its own size, never scaled up
    resize_interpolation: str = ""      # kohya's: lanczos, area, bilinear, ...; "": area to shrink, else lanczos
    random_crop: bool = False
    flip_aug: bool = False
    color_aug: bool = False         # kohya's: a hue turn or a gamma in a third of the draws (train.color_aug)
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0     # kohya's: every caption left out in every Nth epoch
    token_warmup_min: int = 1           # kohya's token warm-up: the tags that move kept at first ...
    token_warmup_step: float = 0.0      # ... growing to all of them by this step (below 1: a share of the run)
    caption_prefix: str = ""        # kohya's caption options (train.captions applies them in kohya's order)
    caption_suffix: str = ""
    caption_separator: str = ","
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    caption_tag_dropout_rate: float = 0.0
    enable_wildcard: bool = False
    prior_loss_weight: float = 1.0
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False        # encode each caption once (needs the text encoders frozen)
    cache_text_encoder_outputs_to_disk: bool = False
    no_half_vae: bool = False       # kohya's: a bf16 run's VAE encodes in its own precision, not in bf16
    # schedule
    train_batch_size: int = 1
    max_train_steps: int = 1600
    max_train_epochs: int = 0           # kohya: when given, it wins over max_train_steps
    gradient_accumulation_steps: int = 1
    seed: int = 42
    # network
    network_module: str = "networks.lora"
    network_dim: int = 4
    network_alpha: float = 1.0
    network_dropout: float = 0.0
    network_args: list = field(default_factory=list)      # "conv_dim=4", "conv_alpha=1", "rank_dropout=0.1", ...
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    dim_from_weights: bool = False      # kohya's: the layers, ranks and alphas of network_weights' file
    vae: str = ""       # kohya's: a VAE file (or diffusers folder) for a headless run, instead of the model's
    base_weights: list = field(default_factory=list)    # kohya's: LoRA files merged into the model for the run
    base_weights_multiplier: list = field(default_factory=list)     # each one's weight (1 past the list's end)
    scale_weight_norms: float = 0.0     # kohya's max-norm limit on each LoRA module's change (train.max_norm); 0: off
    # optimizer
    optimizer_type: str = "AdamW"
    optimizer_args: list = field(default_factory=list)
    learning_rate: float = 2e-6
    unet_lr: float | None = None
    text_encoder_lr: float | list | None = None     # SDXL: one for both encoders, or [te1, te2] (kohya's nargs)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0    # steps; below 1 (or "10%") a share of the run's steps, as kohya reads it
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_timescale: int = 0                 # inverse_sqrt's (0: the warm-up's, else 10000)
    lr_scheduler_min_lr_ratio: float | None = None  # cosine_with_min_lr's and warmup_stable_decay's floor
    lr_decay_steps: int | float = 0                 # warmup_stable_decay's decay: steps, or below 1 a share
    lr_scheduler_type: str = ""                     # kohya's: any torch (or package.module) scheduler class ...
    lr_scheduler_args: list = field(default_factory=list)   # ... made with these key=value arguments
    max_grad_norm: float = 1.0
    # text
    clip_skip: int = 1
    max_token_length: int = 75
    # precision & memory
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # with checkpointing: the share of the run's memory that may go to keeping blocks' activations instead of
    # recomputing them (train.memory.recomputed_blocks; frozen weights stored narrow count as fp32 copies there);
    # 0 = every block recomputed, as kohya does
    checkpointing_margin: float = 0.1
    # a headless run computing in fp32 on a CPU: "fp32" holds fp32 copies of the frozen weights, as kohya does;
    # "as_stored" holds the Linear / Conv weights that the file stores in fp16 / bf16 so, each cast up at its use
    # (the same values in half their memory, for 1.1-1.2x the time per step at 256 px on a 2-core EPYC:
    # train.upcast). The webui's model stays as the webui holds it
    frozen_weights: str = "fp32"
    xformers: bool = False
    sdpa: bool = False
    # loss
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    # kohya's other noise and loss options (train.losses)
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float = 0.0
    min_timestep: int = 0               # noise timesteps are drawn from [min_timestep, max_timestep)
    max_timestep: int = 1000
    zero_terminal_snr: bool = False     # rescale the schedule so that the last timestep is pure noise
    # samples & logging
    sample_every_n_steps: int = 0
    sample_every_n_epochs: int = 0
    sample_at_first: bool = False       # kohya's: previews before the first step too
    sample_prompts: list = field(default_factory=list)
    sample_steps: int = 20
    logging_dir: str = ""
    log_with: str = ""                  # kohya's: "tensorboard" (into logging_dir) is what lora_ext logs to

    # --- derived ----------------------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        m = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+)\s*)?", str(self.resolution))
        if m is None:
            raise ValueError(f"resolution {self.resolution!r}")
        return (int(m[1]), int(m[2] or m[1]))

    @property
    def net_args(self) -> dict:
        out = {}
        for a in self.network_args:
            k, sep, v = str(a).partition("=")
            if not sep:
                raise ConfigError(f"network_args entry {a!r} is not key=value")
            out[k.strip()] = v.strip()
        return out

    def warmup_steps(self, total: int) -> int:
        """The warm-up in steps of a run of `total` optimizer steps (kohya: a share below 1 is of the total)."""
        return _steps(self.lr_warmup_steps, total)

    def lr_at(self, step: int, total: int) -> float:
        """The schedule's factor of the learning rate at optimizer step `step` of `total` (lr_scheduler_type's
        are stepped by the optimizer instead: train.loop)."""
        from .schedules import lr_factor
        return lr_factor(self.lr_scheduler, step, total, self.warmup_steps(total), self.lr_scheduler_num_cycles,
                         self.lr_scheduler_power, lr=self.learning_rate, timescale=self.lr_scheduler_timescale or None,
                         min_lr_ratio=self.lr_scheduler_min_lr_ratio, decay=_steps(self.lr_decay_steps, total))

    def component_lrs(self) -> dict:
        """{'unet', 'te' (SD1/SD2), 'te1', 'te2' (SDXL): lr}. A list text_encoder_lr gives each SDXL encoder
        its own (kohya: the second value is the second encoder's; one value is both's)."""
        unet = self.learning_rate if self.unet_lr is None else self.unet_lr
        te = self.text_encoder_lr if isinstance(self.text_encoder_lr, list) else [self.text_encoder_lr]
        te = [self.learning_rate if v is None else v for v in te] or [self.learning_rate]
        te1, te2 = te[0], te[-1]
        if self.network_train_unet_only:
            te1 = te2 = 0.0
        if self.network_train_text_encoder_only:
            unet = 0.0
        return {"unet": unet, "te": te1, "te1": te1, "te2": te2}

    def validate(self) -> None:
        """Raises ConfigError naming every option that is out of range or contradicts another."""
        problems = _range_problems(self)
        try:
            w, h = self.size
            if w < 64 or h < 64 or w % 8 or h % 8:
                problems.append(f"resolution {self.resolution!r}: each side is a multiple of 8, at least 64")
        except (ValueError, IndexError):
            problems.append(f"resolution {self.resolution!r} is not a number or 'width,height'")
        if self.min_bucket_reso > self.max_bucket_reso:
            problems.append("min_bucket_reso is larger than max_bucket_reso")
        if self.max_token_length not in (75, 150, 225):
            problems.append(f"max_token_length must be 75, 150 or 225, not {self.max_token_length}")
        for name in ("mixed_precision", "save_precision"):
            if getattr(self, name) not in ("fp16", "bf16", "fp32", "no", "float", "float16", "bfloat16"):
                problems.append(f"{name} must be fp16, bf16 or fp32")
        if self.frozen_weights not in ("as_stored", "fp32"):
            problems.append(f"frozen_weights must be as_stored or fp32, not {self.frozen_weights!r}")
        if self.save_model_as != "safetensors":
            problems.append("save_model_as: lora_ext saves safetensors")
        try:
            from .network_args import problems as network_problems     # it reads numbers with ours
            problems += network_problems(self)
        except ConfigError as e:
            problems.append(str(e))
        problems += self._optimizer_problems() + self._loss_problems()
        if self.lr_scheduler == "polynomial" and not self.learning_rate > 1e-7:
            problems.append(f"the polynomial schedule decays to 1e-7: learning_rate ({self.learning_rate:g}) must be "
                            "larger (kohya and diffusers refuse it too)")
        problems += self._timestep_problems() + self.caption_problems() + self._max_norm_problems()
        problems += self._logging_problems() + self._weights_problems()
        from .dataset_config import problems as dataset_problems
        problems += dataset_problems(self)
        thumbnail = self.metadata_thumbnail
        if thumbnail and not thumbnail.startswith("data:"):
            if not os.path.isfile(thumbnail):
                problems.append(f"metadata_thumbnail {thumbnail!r}: give a data: URL or an image file")
            elif os.path.getsize(thumbnail) > 4 << 20:
                problems.append(f"metadata_thumbnail {thumbnail!r} is over 4 MB: a thumbnail is a small image")
        from .prompts import PromptError, load as load_prompts
        try:
            load_prompts(self.sample_prompts)
        except PromptError as e:
            problems.append(f"sample_prompts: {e}")
        if problems:
            raise ConfigError("; ".join(problems))


    def _optimizer_problems(self) -> list:
        """The optimizer and the schedule, as the run would build them (before the model loads, not after)."""
        from .optim import problems
        from .schedules import SCHEDULERS

        out = problems(self.optimizer_type, self.optimizer_args)
        if self.lr_scheduler == "adafactor" and self.optimizer_type.lower() != "adafactor":
            out.append("lr_scheduler adafactor is the Adafactor optimizer's (kohya refuses it with another)")
        if self.lr_scheduler_type:
            out += self._custom_schedule_problems()
        elif self.lr_scheduler not in SCHEDULERS:
            out.append(f"lr_scheduler {self.lr_scheduler!r}: one of {', '.join(SCHEDULERS)}, or a torch scheduler by "
                       "lr_scheduler_type (kohya's piecewise_constant is not done)")
        elif self.lr_scheduler == "cosine_with_min_lr" and self.lr_scheduler_min_lr_ratio is None:
            out.append("lr_scheduler cosine_with_min_lr needs lr_scheduler_min_lr_ratio (its floor, 0 to 1)")
        return out

    def _custom_schedule_problems(self) -> list:
        """lr_scheduler_type's class, made with its arguments on a one-number optimizer, as the run makes it."""
        import torch

        from .schedules import custom

        if self.lr_warmup_steps:
            return [f"lr_scheduler_type {self.lr_scheduler_type} has no warm-up: lr_warmup_steps must be 0 (kohya "
                    "refuses it too)"]
        bad = [a for a in self.lr_scheduler_args if "=" not in str(a)]
        if bad:
            return [f"lr_scheduler_args {bad[0]!r} is not key=value"]
        try:
            custom(self.lr_scheduler_type, self.lr_scheduler_args,
                   torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3))
        except ValueError as e:
            return [str(e)]
        return []

    def _loss_problems(self) -> list:
        out = []
        if self.loss_type not in LOSS_TYPES:
            out.append(f"loss_type {self.loss_type!r}: one of {', '.join(LOSS_TYPES)}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            out.append(f"huber_schedule {self.huber_schedule!r}: one of {', '.join(HUBER_SCHEDULES)}")
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            out.append("adaptive_noise_scale grows noise_offset: give noise_offset too (kohya refuses it alone)")
        if self.v_pred_like_loss and self.v_parameterization:
            out.append("v_pred_like_loss adds a v-prediction-like loss to an eps model's: not with v_parameterization")
        return out

    def caption_problems(self) -> list:
        """The caption and augmentation options (a dataset TOML's subsets check theirs with this too)."""
        out = [p for name in CAPTION_NUMBERS for p in [out_of_range(name, getattr(self, name), *RANGES[name])] if p]
        if not self.caption_separator:
            out.append("caption_separator is empty: tags are split at it (kohya's default is ',')")
        for augment in ("random_crop", "color_aug"):
            if getattr(self, augment) and self.cache_latents:
                out.append(f"{augment} needs the VAE at every step: turn off cache_latents or {augment}")
        if self.resize_interpolation and self.resize_interpolation.lower() not in RESIZE_FILTERS:
            out.append(f"resize_interpolation {self.resize_interpolation!r}: one of {', '.join(RESIZE_FILTERS)} (kohya's)")
        return out + self.text_cache_problems()

    def _logging_problems(self) -> list:
        kind = self.log_with.strip().lower()
        if kind in ("", "tensorboard"):
            return ["log_with tensorboard writes into logging_dir: give it"] if kind and not self.logging_dir else []
        return [f"log_with {self.log_with!r}: lora_ext logs to TensorBoard only (log_with tensorboard, or just "
                "logging_dir); wandb is not used"]

    def _weights_problems(self) -> list:
        if self.dim_from_weights and not self.network_weights:
            return ["dim_from_weights takes the ranks of network_weights: give network_weights"]
        if self.network_weights and not os.path.isfile(self.network_weights):
            return [f"network_weights {self.network_weights!r}: no such file"]
        out = [f"base_weights {p!r}: no such file" for p in self.base_weights if not os.path.isfile(str(p))]
        if self.vae and not os.path.exists(self.vae):
            out.append(f"vae {self.vae!r}: no such file or folder")
        for m in self.base_weights_multiplier:
            try:
                if not math.isfinite(number(m, float)):
                    raise ValueError
            except (TypeError, ValueError, OverflowError):
                out.append(f"base_weights_multiplier {m!r} is not a number")
        return out

    def _max_norm_problems(self) -> list:
        from .max_norm import SCALED_TYPES
        from .network_args import NetworkArgsError, spec

        if not self.scale_weight_norms:
            return []
        try:
            algo = spec(self).algo
        except NetworkArgsError:
            return []           # said by the network's own check
        if algo in SCALED_TYPES:
            return []
        return [f"scale_weight_norms is done for LoRA and LoCon (kohya's networks.lora), not for {algo}"]

    def _timestep_problems(self) -> list:
        if self.min_timestep >= self.max_timestep:
            return [f"min_timestep ({self.min_timestep}) must be below max_timestep ({self.max_timestep})"]
        return []

    def text_cache_problems(self) -> list:
        """kohya's rule: cached text-encoder outputs are fixed per caption, so the encoders are not trained
        and captions do not change from step to step."""
        if not (self.cache_text_encoder_outputs or self.cache_text_encoder_outputs_to_disk):
            return []
        lrs = self.component_lrs()
        problems = []
        if not self.network_train_unet_only and (lrs["te1"] > 0 or lrs["te2"] > 0):
            problems.append("cache_text_encoder_outputs needs the text encoders frozen: add network_train_unet_only")
        changing = [n for n in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate",
                                "enable_wildcard", "caption_dropout_every_n_epochs", "token_warmup_step")
                    if getattr(self, n)]
        if changing:
            problems.append(f"cache_text_encoder_outputs keeps one encoding per caption; {', '.join(changing)} "
                            "changes captions every step: turn one of them off")
        return problems


# (smallest, largest) allowed; None = no bound. Every number must also be finite.
RANGES = {
    "network_dim": (1, 4096), "network_alpha": (0, None), "network_dropout": (0, 0.99),
    "learning_rate": (0, 1), "unet_lr": (0, 1), "text_encoder_lr": (0, 1),
    "train_batch_size": (1, 4096), "max_train_steps": (1, None), "max_train_epochs": (0, None),
    "gradient_accumulation_steps": (1, 4096), "lr_warmup_steps": (0, None), "lr_decay_steps": (0, None),
    "lr_scheduler_timescale": (0, None), "lr_scheduler_min_lr_ratio": (0, 1), "lr_scheduler_num_cycles": (1, None),
    "lr_scheduler_power": (0.01, 100), "max_grad_norm": (0, None), "seed": (0, 2 ** 63 - 1),
    "save_every_n_epochs": (0, None), "save_every_n_steps": (0, None), "save_n_epoch_ratio": (0, None),
    "save_last_n_epochs": (0, None), "save_last_n_steps": (0, None), "sample_every_n_steps": (0, None),
    "sample_every_n_epochs": (0, None), "sample_steps": (1, 1000), "clip_skip": (1, 12), "keep_tokens": (0, None),
    "caption_dropout_rate": (0, 1), "caption_tag_dropout_rate": (0, 1), "caption_dropout_every_n_epochs": (0, None),
    "token_warmup_min": (0, None), "token_warmup_step": (0, None), "prior_loss_weight": (0, None), "noise_offset": (0, 1),
    "min_snr_gamma": (0, None), "multires_noise_iterations": (0, 64), "multires_noise_discount": (0, 1),
    "ip_noise_gamma": (0, 1), "huber_c": (1e-6, 1), "huber_scale": (0, None), "v_pred_like_loss": (0, None),
    "min_timestep": (0, 1000), "max_timestep": (1, 1000), "min_bucket_reso": (64, None), "max_bucket_reso": (64, None),
    "bucket_reso_steps": (8, None), "checkpointing_margin": (0, 10), "scale_weight_norms": (0, None),
}


# kohya's resize_interpolation names -> PIL's filters (kohya resizes with cv2 but for lanczos and box; cv2's
# INTER_AREA is PIL's BOX on a reduction)
RESIZE_FILTERS = {"lanczos": "LANCZOS", "lanczos4": "LANCZOS", "nearest": "NEAREST", "bilinear": "BILINEAR",
                  "linear": "BILINEAR", "bicubic": "BICUBIC", "cubic": "BICUBIC", "area": "BOX", "box": "BOX"}
CAPTION_NUMBERS = ("keep_tokens", "caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs",
                   "token_warmup_min", "token_warmup_step")
# kohya's loss types and Huber thresholds (train.losses computes them)
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
# float options whose None means "not given" (unet_lr: learning_rate's; adaptive_noise_scale: off)
_OPTIONAL_NUMBERS = ("unet_lr", "text_encoder_lr", "adaptive_noise_scale", "lr_scheduler_min_lr_ratio")


def _steps(value: int | float, total: int) -> int:
    """kohya's int_or_float: a float below 1 is a share of the run's `total` steps."""
    return int(value * total) if isinstance(value, float) else value


def _full_matrix(cfg) -> int | None:
    """The largest dim taken where a large dim is LyCORIS's full-matrix idiom (a LoKr), else None."""
    from .network_args import FULL_MATRIX_DIM, full_matrix_idiom
    try:
        return FULL_MATRIX_DIM if full_matrix_idiom(cfg) else None
    except ConfigError:
        return None             # network_args that are no key=value: said by the network's own check


def _range_problems(cfg) -> list:
    problems = []
    for name, (lo, hi) in RANGES.items():
        if name in CAPTION_NUMBERS:
            continue            # TrainConfig.caption_problems
        if name == "network_dim" and _full_matrix(cfg):
            hi = _full_matrix(cfg)
        v = getattr(cfg, name)
        if v is None and name in _OPTIONAL_NUMBERS:
            continue
        if name == "max_train_steps" and cfg.max_train_epochs:
            continue            # the epochs decide (as in kohya); the steps are not used
        if name == "bucket_reso_steps" and not cfg.enable_bucket:
            continue            # read only with buckets (the kohya_ss GUI saves 1 in some presets)
        for x in v if isinstance(v, list) else [v]:
            problem = out_of_range(name, x, lo, hi)
            if problem:
                problems.append(problem)
    if isinstance(cfg.text_encoder_lr, list) and not 1 <= len(cfg.text_encoder_lr) <= 2:
        problems.append(f"text_encoder_lr takes one value, or two (SDXL's two encoders), not {len(cfg.text_encoder_lr)}")
    return problems


# where this CLI's default differs from kohya's, and why: printed before training
DIFFERENT_DEFAULTS = {"seed": "42, so that a run repeats (kohya: a random seed)"}
# the guide's starting values, for the training tab (the CLI keeps kohya's)
GUIDE_DEFAULTS = dict(caption_extension=".txt", network_dim=128, network_alpha=1.0, learning_rate=1e-4,
                      lr_scheduler="cosine_with_restarts", mixed_precision="fp16", save_precision="fp16",
                      max_train_epochs=10, max_train_steps=0)


def notes(values: dict) -> list:
    """One line per option given that means nothing here, and per default of ours that is not kohya's."""
    given, _ = kohya_options.resolve_aliases(_flat(values))
    _, out = kohya_options.check(given, field_names())
    out += [f"note: {k} defaults to {why}" for k, why in DIFFERENT_DEFAULTS.items() if k not in given]
    return out


def _flat(values: dict) -> dict:
    flat = {}
    for k, v in values.items():
        if isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return flat


def from_dict(values: dict, source: str = "options") -> TrainConfig:
    """A TrainConfig from a flat dict (kohya's TOML may nest options in tables: those are flattened). Every
    problem of the options (names, values, ranges, network arguments, prompts, optimizer, schedule) is in one
    ConfigError."""
    flat, problems = kohya_options.resolve_aliases(_flat(values))
    names = {f.name: f for f in fields(TrainConfig)}
    problems += kohya_options.check(flat, set(names))[0]
    cfg = TrainConfig()
    for k, v in flat.items():
        if k not in names:
            continue            # kohya's, without effect here or refused above
        if k in ("network_args", "optimizer_args", "lr_scheduler_args", "sample_prompts") and isinstance(v, str):
            v = v.split() if k != "sample_prompts" else [p for p in v.split("\n") if p.strip()]
        if k in ("base_weights", "base_weights_multiplier") and not isinstance(v, (list, tuple)):
            v = [v] if k == "base_weights" else str(v).replace(",", " ").split()
        if k == "resolution" and isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        try:
            setattr(cfg, k, _coerce(names[k], v))
        except ConfigError as e:
            problems.append(str(e))
    try:
        cfg.validate()
    except ConfigError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return cfg


def _coerce(f: dataclasses.Field, v):
    kind = type(f.default) if f.default is not dataclasses.MISSING and f.default is not None else None
    if f.name == "text_encoder_lr" and isinstance(v, str) and len(v.replace(",", " ").split()) > 1:
        v = v.replace(",", " ").split()         # the tab's "1e-5, 2e-5": one per SDXL encoder
    if f.name == "text_encoder_lr" and isinstance(v, (list, tuple)):
        values = [_coerce(f, x) for x in v]
        return None if not values else values[0] if len(values) == 1 else values
    if f.name in ("lr_warmup_steps", "lr_decay_steps"):
        return _steps_or_share(f.name, v)
    if f.name in _OPTIONAL_NUMBERS:
        kind = float
        if v in (None, ""):
            return None
    if kind is bool:
        try:
            return flag_value(v, f.name)
        except ValueError:
            raise ConfigError(f"{f.name} = {v!r} is not true or false") from None
    if kind in (int, float):
        try:
            return number(v, kind)
        except (ValueError, TypeError, OverflowError):
            whole = "a whole number" if kind is int else "a number"
            raise ConfigError(f"{f.name} = {v!r} is not {whole}") from None
    if kind is str and not isinstance(v, str):
        raise ConfigError(f"{f.name} = {v!r} is not text")
    return v


def _steps_or_share(name: str, v) -> int | float:
    """kohya's int_or_float: "10%" and values below 1 are a share of the run's steps, others whole steps."""
    try:
        share = isinstance(v, str) and v.strip().endswith("%")
        x = number(v.strip()[:-1], float) / 100 if share else number(v, float)
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(f"{name} = {v!r} is not a number") from None
    if not math.isfinite(x):
        raise ConfigError(f"{name} = {v!r} is not a number of steps")
    if x < 1:
        return x
    if x != int(x):
        raise ConfigError(f"{name} = {v!r}: a number of steps is whole; below 1 it is a share of the run's steps")
    return int(x)


def field_names() -> set:
    return {f.name for f in fields(TrainConfig)}


def load_toml(path: str) -> TrainConfig:
    return from_dict(load_toml_dict(path), path)


def load_config_dict(path: str) -> tuple[dict, list]:
    """(options, notes) of a configuration file: kohya's TOML (no notes), or the kohya_ss GUI's JSON (its
    fields turned into kohya's options; a note per field not taken)."""
    if not path.lower().endswith(".json"):
        return load_toml_dict(path), []
    from .kohya_gui import GuiConfigError, read

    try:
        with open(path, encoding="utf-8") as f:
            return read(f.read())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (UnicodeDecodeError, GuiConfigError) as e:
        raise ConfigError(f"{path}: {e if isinstance(e, GuiConfigError) else 'not a text file (JSON is UTF-8)'}") from None


def load_toml_dict(path: str) -> dict:
    from ..toml_text import parse

    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (TOML is UTF-8)") from None
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


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
