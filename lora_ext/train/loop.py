"""The training loop, host-agnostic: it asks the host for targets, text conditioning, latents and
predictions, and never which host it runs on. Progress leaves as events; the loop knows no subscriber.

Read top to bottom: prepare data -> attach the LoRA -> (resume) -> for each optimizer step: noise, predict,
loss, step -> save. Cancelling stops at the next step, saves the LoRA and a state to resume from."""
from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch

from .. import files
from . import batches, dataset, optim, state
from ..hosts.ldm_attention import sdpa_patches
from .config import TrainConfig
from .distributed import Dist
from .network import network_for
from .outputs import check_outputs
from .schedules import lr_factor
from .session import HostSession


@dataclass
class Event:
    kind: str                   # 'message' | 'step' | 'sample' | 'save' | 'done' | 'cancelled'
    step: int = 0
    total: int = 0
    epoch: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    it_s: float | None = None
    eta_s: float | None = None
    paths: list = field(default_factory=list)
    text: str = ""


@dataclass
class Result:
    lora_path: str | None
    state_path: str | None
    steps: int
    cancelled: bool
    losses: list
    report: dict
    messages: list


def prepare_data(host, cfg: TrainConfig):
    """(scan, buckets, report). Raises DatasetError when there is nothing to train on."""
    scan = dataset.scan(cfg.train_data_dir, cfg.reg_data_dir or None, cfg.caption_extension)
    res = max(cfg.size)
    buckets = (dataset.make_buckets(res, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
               if cfg.enable_bucket else None)
    report = dataset.report(scan, res, buckets, cfg.max_token_length, host.count_tokens)
    return scan, buckets, report


def schedule(scan, buckets, cfg: TrainConfig, world: int = 1):
    """(plan, optimizer steps per epoch, total steps, epochs): `plan(epoch)` gives an epoch's batches, which
    are global: each of the `world` processes takes train_batch_size samples of each."""
    def plan(epoch):
        return batches.epoch_plan(scan.train_items, scan.reg_items, buckets, max(cfg.size),
                                  cfg.train_batch_size * world, cfg.seed, epoch)
    per_epoch = math.ceil(len(plan(0)) / cfg.gradient_accumulation_steps)
    total = per_epoch * cfg.max_train_epochs if cfg.max_train_epochs else cfg.max_train_steps     # kohya: epochs win
    return plan, per_epoch, total, math.ceil(total / per_epoch)


def train(host, cfg: TrainConfig, on_event=None, should_stop=None) -> Result:
    emit = on_event or (lambda e: None)
    stop = should_stop or (lambda: False)
    messages: list = []
    cfg.validate()
    check_outputs(cfg)
    scan, buckets, report = prepare_data(host, cfg)
    for s in report["skipped"]:
        emit(Event("message", text=f"skipped {s['file']}: {s['reason']}"))
    for w in report["warnings"]:
        emit(Event("message", text=f"warning: {w}"))
    aug = batches.Augment(cfg.flip_aug, cfg.random_crop, cfg.shuffle_caption, cfg.keep_tokens, cfg.caption_dropout_rate)
    dist = Dist.from_env()
    plan, per_epoch, total, epochs = schedule(scan, buckets, cfg, dist.world)

    unet_lr, te_lr = cfg.lrs()
    device = next(host.unet.parameters()).device
    amp = optim.autocast_dtype(cfg.mixed_precision, device, messages)
    for m in messages:
        emit(Event("message", text=m))

    torch.manual_seed(cfg.seed)     # the LoRA's initialisation, then dropout: the same run for the same seed
    network = network_for(host, cfg, unet_lr, te_lr).to(device)
    blocks = host.checkpoint_blocks()
    patches = sdpa_patches(host.unet)
    if cfg.xformers and patches:
        messages.append("xformers is not used here; torch's scaled_dot_product_attention does the same job")
    with HostSession(host.model, blocks if cfg.gradient_checkpointing else (), patches):
        network.attach()
        try:
            return _run(host, cfg, network, scan, plan, aug, per_epoch, total, epochs, unet_lr, te_lr, amp,
                        report, messages, emit if dist.main else (lambda e: None), stop, dist)
        finally:
            network.detach()


def _run(host, cfg, network, scan, plan, aug, per_epoch, total, epochs, unet_lr, te_lr, amp, report, messages,
         emit, stop, dist) -> Result:
    groups = [g for g in ({"params": network.unet_parameters(), "lr": unet_lr},
                          {"params": network.te_parameters(), "lr": te_lr}) if g["params"] and g["lr"] > 0]
    if not groups:
        raise ValueError("nothing to train: both the UNet and the text encoder learning rates are 0")
    optimizer = optim.make_optimizer(cfg.optimizer_type, groups, cfg.optimizer_args, messages)
    train_te = te_lr > 0 and bool(network.te_parameters())
    loop = _Loop(host, cfg, network, optimizer, plan, aug, amp, train_te, total, report, emit, stop, dist)
    if cfg.network_weights:
        network.load_stored(files.read(cfg.network_weights, host.arch).modules)
    if cfg.resume:
        loop.step, epoch0, batch0, loop.losses = _load_state(cfg.resume, network, optimizer)
        loop.at = (epoch0, batch0)
        emit(Event("message", text=f"resumed at step {loop.step} (epoch {epoch0 + 1})"))
    vae_device = next(host.vae.parameters()).device
    try:
        loop.run(epochs)
    except Exception:
        # a crash (out of memory, a bad image, a full disk) keeps the steps done: the LoRA and a state at
        # the last whole step, from which --resume redoes the lost micro-batches
        if loop.step > loop.done_at_start and dist.main:
            loop.rescue()
        raise
    host.vae.to(vae_device)
    lora_path = loop.save(loop.out_path) if dist.main else None
    state_path = None
    if (loop.cancelled or cfg.save_state) and dist.main:
        state_path = loop.save_state(loop.at if loop.cancelled else (epochs, 0))
    emit(Event("cancelled" if loop.cancelled else "done", loop.step, total, loop.epoch + 1,
               paths=[lora_path] + ([state_path] if state_path else [])))
    return Result(lora_path, state_path, loop.step, loop.cancelled, loop.losses, report, messages)


class _Loop:
    """The optimizer steps of one run and what they carry between them: the step count, where a resume
    would continue (`at`: epoch, batch after the last step), the losses."""

    def __init__(self, host, cfg, network, optimizer, plan, aug, amp, train_te, total, report, emit, stop, dist):
        self.host, self.cfg, self.network, self.optimizer, self.plan, self.aug = host, cfg, network, optimizer, plan, aug
        self.amp, self.train_te, self.total, self.report = amp, train_te, total, report
        self.emit, self.stop, self.dist = emit, stop, dist
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step, self.at, self.epoch, self.losses, self.micro_losses = 0, (0, 0), 0, [], []
        self.cancelled = False
        # latents are cached the first time a batch needs them, so the first step comes after one encode,
        # not after the whole dataset's; once all are cached (without flips) the VAE leaves the device
        self.cache = (batches.LatentCache(lambda px: host.encode_images(px, [cfg.seed] * len(px)),
                                          to_disk=cfg.cache_latents_to_disk) if cfg.cache_latents else None)
        self.needed = {(s.item.path, s.bucket) for batch in plan(0) for s in batch}
        self.ac = host.alphas_cumprod.detach().float()
        self.out_path = os.path.join(cfg.output_dir, f"{cfg.output_name}.safetensors")

    def run(self, epochs: int) -> None:
        self.started, self.done_at_start, self.epoch = time.perf_counter(), self.step, self.at[0]
        for epoch in range(self.at[0], epochs):
            self.epoch = epoch
            self._epoch(epoch, skip=self.at[1] if epoch == self.at[0] else 0)
            if self.cancelled:
                return
            self.at = (epoch + 1, 0)
            last = self.step >= self.total
            cfg = self.cfg
            if cfg.save_every_n_epochs and (epoch + 1) % cfg.save_every_n_epochs == 0 and not last:
                self._snapshot(_numbered(self.out_path, f"{epoch + 1:06d}"))
            if cfg.sample_every_n_epochs and ((epoch + 1) % cfg.sample_every_n_epochs == 0 or last) and self.dist.main:
                _samples(self.host, cfg, self.network, self.step, epoch, self.emit)
            if last:
                return

    def _epoch(self, epoch: int, skip: int) -> None:
        cfg, batches_of_epoch, micro = self.cfg, self.plan(epoch), 0
        for b, batch in enumerate(batches_of_epoch):
            if b < skip:
                continue
            if self.step >= self.total:
                return
            if self.dist.any(self.stop()):
                self.cancelled = True
                return
            self._backward(batch)
            micro += 1
            if micro % cfg.gradient_accumulation_steps and b + 1 < len(batches_of_epoch):
                continue
            micro = 0
            factor = _optimizer_step(cfg, self.optimizer, self.scaler, self.base_lrs, self.step, self.total, self.dist)
            self.step, self.at = self.step + 1, (epoch, b + 1)
            self._after_step(epoch, factor)

    def _backward(self, batch) -> None:
        cfg, dist = self.cfg, self.dist
        local = dist.local(batch, cfg.train_batch_size)
        loss_sum = _loss_sum(self.host, cfg, local, self.aug, self.cache, self.ac, self.amp, self.train_te) \
            if local else None
        if loss_sum is not None:
            self.scaler.scale(loss_sum / (len(batch) * cfg.gradient_accumulation_steps)).backward()
        self.micro_losses.append(dist.sum(float(loss_sum.detach()) if loss_sum is not None else 0.0) / len(batch))
        vae = self.host.vae
        if self.cache is not None and not cfg.flip_aug and next(vae.parameters()).device.type != "cpu" \
                and self.needed <= self.cache.keys():
            vae.to("cpu")      # not needed again this run; HostSession puts it back

    def _after_step(self, epoch: int, factor: float) -> None:
        cfg, step, losses = self.cfg, self.step, self.losses
        losses.append(sum(self.micro_losses) / len(self.micro_losses))
        self.micro_losses.clear()
        elapsed = time.perf_counter() - self.started
        rate = (step - self.done_at_start) / elapsed if elapsed > 0 else None
        self.emit(Event("step", step, self.total, epoch + 1, losses[-1], sum(losses[-50:]) / len(losses[-50:]),
                        self.base_lrs[0] * factor, rate, (self.total - step) / rate if rate else None))
        if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0 and self.dist.main:
            _samples(self.host, cfg, self.network, step, epoch, self.emit)
        if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < self.total:
            self._snapshot(_numbered(self.out_path, f"step{step:06d}"))

    def save(self, path: str) -> str:
        return _save(self.host, self.cfg, self.network, self.report, self.step, self.epoch, path, self.emit)

    def save_state(self, resume_at: tuple) -> str:
        return _save_state(self.cfg, self.network, self.optimizer, self.step, *resume_at, self.losses)

    def _snapshot(self, path: str) -> None:
        """A numbered LoRA, and with save_state the state to resume from it (so that a kill -9 loses at
        most the steps since)."""
        if self.dist.main:
            self.save(path)
            if self.cfg.save_state:
                self.save_state(self.at)

    def rescue(self) -> None:
        try:
            self.save(self.out_path)
            folder = self.save_state(self.at)
            self.emit(Event("message", self.step, text=f"stopped by an error after step {self.step}: saved "
                                                      f"{self.out_path} and the state {folder}; fix the cause "
                                                      "and resume from it"))
        except Exception:       # the disk may be what failed: the original error is the one to report
            pass


def _optimizer_step(cfg, optimizer, scaler, base_lrs, step, total, dist) -> float:
    """One update from the summed gradients, at the scheduled learning rate (returned as its factor)."""
    factor = lr_factor(cfg.lr_scheduler, step, total, cfg.lr_warmup_steps, cfg.lr_scheduler_num_cycles,
                       cfg.lr_scheduler_power)
    for g, base in zip(optimizer.param_groups, base_lrs):
        g["lr"] = base * factor
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    dist.sum_grads(trained)
    scaler.unscale_(optimizer)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return factor


def _sample_rng(sample, salt: int) -> torch.Generator:
    # every random draw of a sample comes from its own seed (set by the epoch plan): the same whichever
    # process takes it, and whether the run was resumed or not
    return torch.Generator().manual_seed((sample.seed ^ salt) & (2 ** 62 - 1))


def _loss_sum(host, cfg, batch, aug, cache, ac, amp, train_te):
    """The summed denoising loss of the samples: noise added at a random timestep, predicted, compared (MSE
    per sample, optionally min-SNR weighted, regularization images weighted by prior_loss_weight)."""
    device = next(host.unet.parameters()).device
    flips = [batches.flipped(s, aug) for s in batch]
    if cache is not None:
        latents = torch.stack([cache.get(s, aug, f) for s, f in zip(batch, flips)])
    else:
        with torch.no_grad():
            px = torch.stack([batches.pixels(s, aug) for s in batch])
            latents = host.encode_images(px, [s.seed ^ 0x5EED for s in batch]).float()
    latents = latents.to(device)
    captions = [batches.caption_of(s, aug) for s in batch]
    with torch.set_grad_enabled(train_te), _autocast(device, amp):
        cond = host.encode_prompts(captions, cfg.clip_skip, cfg.max_token_length)
    noise, t = [], []
    for s in batch:
        g = _sample_rng(s, 0x0015E)
        n = torch.randn(latents.shape[1:], generator=g)
        if cfg.noise_offset:
            n = n + cfg.noise_offset * torch.randn(latents.shape[1:2] + (1, 1), generator=g)
        noise.append(n)
        t.append(torch.randint(0, len(ac), (1,), generator=g))
    noise, t = torch.stack(noise).to(device), torch.cat(t)
    a = ac[t].to(device).view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = noise if host.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * latents
    with _autocast(device, amp):
        pred = host.predict(noisy, t.to(device), cond)
    per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        snr = (a / (1 - a)).view(-1)
        clipped = torch.clamp(snr, max=cfg.min_snr_gamma)
        per_sample = per_sample * (clipped / snr if host.prediction == "eps" else clipped / (snr + 1))
    weights = torch.tensor([cfg.prior_loss_weight if s.item.is_reg else 1.0 for s in batch], device=device)
    return (per_sample * weights).sum()


def _autocast(device, dtype):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _numbered(path: str, suffix: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}-{suffix}{ext}"


def _save(host, cfg, network, report, step, epoch, path, emit) -> str:
    meta = metadata(host, cfg, report, step, epoch)
    files.write_kohya(path, files.kohya_tensors(network.stored(optim.save_dtype(cfg.save_precision))), meta,
                      overwrite=True)
    emit(Event("save", step, paths=[path]))
    return path


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


def metadata(host, cfg: TrainConfig, report: dict, step: int, epoch: int) -> dict:
    args = cfg.net_args
    network = "locon" if "conv_dim" in args else "lora"
    extra = dict(conv_dim=args.get("conv_dim"), conv_alpha=args.get("conv_alpha", 1.0)) if network == "locon" else {}
    w, h = cfg.size
    return files.network_metadata(
        network, cfg.network_dim, cfg.network_alpha, host.arch, **extra,
        ss_output_name=cfg.output_name, ss_learning_rate=cfg.learning_rate, ss_unet_lr=cfg.lrs()[0],
        ss_text_encoder_lr=cfg.lrs()[1], ss_num_train_images=report["train_images"],
        ss_num_reg_images=report["reg_images"], ss_num_epochs=epoch + 1, ss_steps=step,
        ss_max_train_steps=None if cfg.max_train_epochs else cfg.max_train_steps, ss_lr_warmup_steps=cfg.lr_warmup_steps,
        ss_lr_scheduler=cfg.lr_scheduler, ss_optimizer=cfg.optimizer_type, ss_mixed_precision=cfg.mixed_precision,
        ss_gradient_checkpointing=cfg.gradient_checkpointing, ss_gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        ss_clip_skip=cfg.clip_skip, ss_max_token_length=cfg.max_token_length, ss_cache_latents=cfg.cache_latents,
        ss_seed=cfg.seed, ss_noise_offset=cfg.noise_offset or None, ss_min_snr_gamma=cfg.min_snr_gamma or None,
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


def _samples(host, cfg, network, step, epoch, emit) -> None:
    from .sampling import sample_image

    network.eval()          # no LoRA dropout in previews
    paths = []
    folder = os.path.join(cfg.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    for i, prompt in enumerate(cfg.sample_prompts):
        image = sample_image(host, prompt, cfg.seed + i, cfg.sample_steps, size=cfg.size, clip_skip=cfg.clip_skip,
                             max_tokens=cfg.max_token_length)
        path = os.path.join(folder, f"{cfg.output_name}_e{epoch + 1:04d}_s{step:06d}_{i:02d}.png")
        image.save(path)
        paths.append(path)
    network.train()
    if paths:
        emit(Event("sample", step, epoch=epoch + 1, paths=paths))


# --- resumable state ---------------------------------------------------------------------------------------

def _save_state(cfg, network, optimizer, step, epoch, batch, losses) -> str:
    folder = state.state_folder(cfg.state_dir or cfg.output_dir, cfg.output_name)
    return state.save(folder, network, optimizer, {"step": step, "epoch": epoch, "batch": batch, "losses": losses})


def _load_state(path, network, optimizer):
    counters = state.load(path, network, optimizer)
    return counters["step"], counters["epoch"], counters["batch"], list(counters["losses"])
