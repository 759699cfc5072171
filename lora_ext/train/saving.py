"""What a run writes beside its steps: the LoRA file with kohya's ss_* metadata (the record of the base
model, the data and every option) and the preview images."""
from __future__ import annotations

import datetime
import functools
import json
import os
import random

from .. import files
from . import network_args, optim
from .config import TrainConfig
from .dataset_config import widest
from .events import Event


def save_lora(run, step: int, epoch: int, path: str, avg_loss: float | None = None, extra: dict | None = None) -> str:
    """`avg_loss`: the average of the last 50 step losses, kept as lora_ext_avg_loss (what the comparison
    grid shows beside each save; kohya's tools ignore keys that are not theirs). `extra`: the run's features'
    metadata."""
    meta = {**metadata(run.host, run.cfg, run.spec, run.report, step, epoch), **modelspec(run), **(extra or {})}
    if avg_loss is not None:
        meta["lora_ext_avg_loss"] = f"{avg_loss:.6g}"
    if run.cfg.no_metadata:     # kohya's: what loading the network needs, and the model spec
        meta = {k: v for k, v in meta.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}
    stored = run.network.stored(optim.save_dtype(run.cfg.save_precision))
    files.write_kohya(path, files.kohya_tensors(stored), meta, overwrite=True)
    run.emit(Event("save", step, paths=[path]))
    return path


# the ss_* keys kohya writes under --no_metadata (train_util.SS_METADATA_MINIMUM_KEYS)
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


def modelspec(run) -> dict:
    """The Stability AI model spec keys kohya writes beside ss_* (what ComfyUI and model sites read)."""
    cfg, arch = run.cfg, run.host.arch.name
    architecture = "stable-diffusion-v2-768-v" if arch == "sd2" and run.prediction == "v" else ARCHITECTURES[arch]
    w, h = cfg.size
    timesteps = (cfg.min_timestep, cfg.max_timestep) != (0, 1000)
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture}/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if arch == "sdxl" else "diffusers",
            "modelspec.title": cfg.output_name, "modelspec.resolution": f"{w}x{h}",
            "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
            "modelspec.prediction_type": "v" if run.prediction == "v" else "epsilon",
            "modelspec.timestep_range": f"{cfg.min_timestep},{cfg.max_timestep}" if timesteps else None,
            "modelspec.encoder_layer": cfg.clip_skip if cfg.clip_skip > 1 else None,
            **_given_spec_fields(cfg)}


# kohya's --metadata_<name> options, written as modelspec.<name> where given (the title above)
SPEC_FIELDS = ("author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
               "trigger_phrase", "preprocessor", "is_negative_embedding")


def _given_spec_fields(cfg: TrainConfig) -> dict:
    out = {f"modelspec.{name}": getattr(cfg, f"metadata_{name}") for name in SPEC_FIELDS
           if getattr(cfg, f"metadata_{name}")}
    if cfg.metadata_title:
        out["modelspec.title"] = cfg.metadata_title
    if out.get("modelspec.thumbnail") and not out["modelspec.thumbnail"].startswith("data:"):
        out["modelspec.thumbnail"] = _data_url(out["modelspec.thumbnail"])
    return out


def _data_url(path: str) -> str:
    """An image file (at most 4 MB: TrainConfig.validate) as a data URL, kohya's form of a thumbnail file."""
    import base64
    import mimetypes

    kind = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{kind};base64,{base64.b64encode(f.read()).decode()}"


def base_checkpoint(host, cfg: TrainConfig) -> dict:
    """kohya's record of the model trained on: its file name and hashes (the webui's loaded checkpoint, or
    the checkpoint named on the command line)."""
    info = getattr(host.model, "sd_checkpoint_info", None)       # the webui's, when trained there
    path = getattr(info, "filename", None) or cfg.pretrained_model_name_or_path
    if not path:
        return {}
    if not os.path.isfile(path):
        return {"ss_sd_model_name": os.path.basename(os.path.normpath(path))}
    name = {"ss_sd_model_name": os.path.basename(path)}
    if getattr(info, "sha256", None) and getattr(info, "hash", None):
        # the webui hashed it when loading it (the same two hashes): no second read of gigabytes
        return {**name, "ss_sd_model_hash": info.hash, "ss_new_sd_model_hash": info.sha256}
    st = os.stat(path)
    return {**name, **_checkpoint_hashes(path, st.st_mtime_ns, st.st_size)}


@functools.lru_cache(maxsize=4)
def _checkpoint_hashes(path: str, mtime_ns: int, size: int) -> dict:
    # once per file and version: a run saves many times
    from ..safetensors_io import file_hashes, legacy_model_hash
    return {"ss_sd_model_hash": legacy_model_hash(path), "ss_new_sd_model_hash": file_hashes(path)["sha256"]}


def metadata(host, cfg: TrainConfig, spec: network_args.NetworkSpec, report: dict, step: int, epoch: int) -> dict:
    cfg = widest(cfg)       # a dataset TOML's datasets as kohya's ss_* sum them up: the largest, any flip
    w, h = cfg.size
    return files.network_metadata(
        "locon" if spec.conv_dim else "lora", spec.dim, spec.alpha, host.arch, spec.module,
        spec.file_args(), conv_dim=spec.conv_dim, conv_alpha=spec.conv_alpha,
        ss_output_name=cfg.output_name, ss_learning_rate=cfg.learning_rate, ss_unet_lr=spec.lrs["unet"],
        ss_text_encoder_lr=cfg.text_encoder_lr if isinstance(cfg.text_encoder_lr, list) else spec.lrs["te"],
        ss_zero_terminal_snr=cfg.zero_terminal_snr or None, ss_num_train_images=report["train_images"],
        ss_num_reg_images=report["reg_images"], ss_num_epochs=epoch + 1, ss_steps=step,
        ss_max_train_steps=None if cfg.max_train_epochs else cfg.max_train_steps, ss_lr_warmup_steps=cfg.lr_warmup_steps,
        ss_lr_scheduler=cfg.lr_scheduler, ss_optimizer=cfg.optimizer_type, ss_mixed_precision=cfg.mixed_precision,
        ss_gradient_checkpointing=cfg.gradient_checkpointing, ss_gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        ss_clip_skip=cfg.clip_skip, ss_max_token_length=cfg.max_token_length, ss_cache_latents=cfg.cache_latents,
        ss_seed=cfg.seed, ss_noise_offset=cfg.noise_offset or None, ss_min_snr_gamma=cfg.min_snr_gamma or None,
        ss_multires_noise_iterations=cfg.multires_noise_iterations or None,
        ss_multires_noise_discount=cfg.multires_noise_discount if cfg.multires_noise_iterations else None,
        ss_adaptive_noise_scale=cfg.adaptive_noise_scale, ss_ip_noise_gamma=cfg.ip_noise_gamma or None,
        ss_debiased_estimation=cfg.debiased_estimation_loss, ss_noise_offset_random_strength=cfg.noise_offset_random_strength,
        ss_ip_noise_gamma_random_strength=cfg.ip_noise_gamma_random_strength, ss_loss_type=cfg.loss_type,
        ss_huber_schedule=cfg.huber_schedule, ss_huber_scale=cfg.huber_scale, ss_huber_c=cfg.huber_c,
        ss_network_dropout=cfg.network_dropout or None, ss_resolution=f"({w}, {h})",
        ss_batch_size_per_device=cfg.train_batch_size, ss_enable_bucket=cfg.enable_bucket,
        ss_flip_aug=cfg.flip_aug, ss_random_crop=cfg.random_crop, ss_shuffle_caption=cfg.shuffle_caption,
        ss_keep_tokens=cfg.keep_tokens, ss_caption_dropout_rate=cfg.caption_dropout_rate,
        ss_prior_loss_weight=cfg.prior_loss_weight, ss_training_comment=cfg.training_comment or None,
        ss_tag_frequency=json.dumps(report["tag_frequency"]),
        ss_dataset_dirs=json.dumps({os.path.basename(c["folder"]): {"n_repeats": c["repeats"], "img_count": c["images"]}
                                    for c in report["concepts"] if not c["regularization"]}),
        ss_reg_dataset_dirs=json.dumps({os.path.basename(c["folder"]): {"n_repeats": c["repeats"], "img_count": c["images"]}
                                        for c in report["concepts"] if c["regularization"]}),
        ss_training_started_at=None, ss_session_id=random.randint(0, 2 ** 31), **base_checkpoint(host, cfg))


def samples(run, step: int, epoch: int) -> None:
    """The previews of cfg.sample_prompts with the LoRA as trained so far (no dropout), as PNGs in
    <output_dir>/samples; announced as one 'sample' event."""
    from .sampling import sample_image

    cfg = run.cfg
    run.network.eval()
    paths = []
    folder = os.path.join(cfg.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    from .step import autocast

    for i, p in enumerate(run.previews):
        size = (p.width or cfg.size[0], p.height or cfg.size[1])
        extra = {"cfg_scale": p.scale} if p.scale is not None else {}
        with autocast(run.device, run.amp):     # the frozen weights are held in the run's precision
            image = sample_image(run.host, p.prompt, cfg.seed + i if p.seed is None else p.seed,
                                 p.steps or cfg.sample_steps, size=size, negative=p.negative, clip_skip=cfg.clip_skip,
                                 max_tokens=cfg.max_token_length, schedule=(run.ac, run.prediction), **extra)
        path = os.path.join(folder, f"{cfg.output_name}_e{epoch + 1:04d}_s{step:06d}_{i:02d}.png")
        image.save(path)
        paths.append(path)
    run.network.train()
    if paths:
        run.emit(Event("sample", step, epoch=epoch + 1, paths=paths))
