"""The training loop, host-agnostic: it asks the host for targets, text conditioning, latents and
predictions, and never which host it runs on. Progress leaves as events; the loop knows no subscriber.

Read top to bottom: prepare (data, schedule, precision) -> attach the LoRA -> optimizer, (resume) -> for each
optimizer step: the micro-batches' losses (step.py), backward, update -> save. Cancelling stops at the next
step, saves the LoRA and a state to resume from; a crash saves them too."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from .. import files
from . import (base_weights, batches, dataset, dataset_config, features, max_norm, network_args, optim, prompts, schedules, state,
               step as step_math)
from .config import TrainConfig
from .cpu_conv import Chooser, conv_patches
from .distributed import Dist
from .events import Event, Result
from .leaving import decoder_parts, encoders_leave, free, freed, unet_after_encoders, vae_leaves
from .network import network_for
from .outputs import check_outputs, claimed
from .saving import save_lora
from .schedules import zero_terminal_snr
from .session import HostSession, frozen_roots
from .text_cache import TextCache, fingerprint
from .upcast import upcast_patches


def prepare_data(host, cfg: TrainConfig, scan=None):
    """(scan, report). Raises DatasetError when there is nothing to train on. `scan`: one already made of
    the run's data (the CLI checks the data before loading the model)."""
    if scan is None:
        scan = dataset_config.scan_run(cfg)
    report = dataset.report(scan, cfg.max_token_length, host.count_tokens)
    # the comparison with the model's own resolution is for full-size models (tiny test models have none)
    full_size = sum(p.numel() for p in host.unet.parameters()) > 500_000_000
    v = cfg.v_parameterization or host.prediction == "v"
    native = dataset.NATIVE_RESOLUTION["sd2-v" if host.arch.name == "sd2" and v else host.arch.name] if full_size else None
    report["warnings"] += dataset.resolution_warnings(scan, native, host.arch.name)
    return scan, report


def schedule(scan, cfg: TrainConfig, world: int = 1):
    """(plan, optimizer steps per epoch, total steps, epochs): `plan(epoch)` gives an epoch's batches, which
    are global: each of the `world` processes takes its batch size's share of each."""
    def plan(epoch):
        return batches.run_plan(scan, world, cfg.seed, epoch)
    per_epoch = math.ceil(len(plan(0)) / cfg.gradient_accumulation_steps)
    total = per_epoch * cfg.max_train_epochs if cfg.max_train_epochs else cfg.max_train_steps     # kohya: epochs win
    return plan, per_epoch, total, math.ceil(total / per_epoch)


@dataclass
class Run:
    """One run's fixed parts, set up before its first step; every later step reads them from here."""
    host: object
    cfg: TrainConfig
    report: dict
    plan: object                # epoch -> batches
    total: int                  # optimizer steps
    epochs: int
    aug: batches.Augment
    dist: Dist
    device: torch.device
    amp: torch.dtype | None     # autocast dtype, None = full precision
    prediction: str             # 'eps' | 'v': what the UNet predicts (the model's, or --v_parameterization)
    ac: torch.Tensor            # the noise schedule's alphas_cumprod (zero terminal SNR applied)
    emit: object
    stop: object
    messages: list = field(default_factory=list)
    spec: object = None         # network_args.NetworkSpec: the network and its parts' lrs, parsed once here
    network: object = None
    optimizer: object = None
    latent_cache: object = None
    text_cache: object = None
    convs: object = None        # on the CPU: the kernel each convolution shape ran on (train.cpu_conv)
    scheduler: object = None    # lr_scheduler_type's torch scheduler (else the schedule is cfg.lr_at's factor)
    previews: list = field(default_factory=list)    # prompts.SamplePrompt of sample_prompts (files read)
    features: list = field(default_factory=list)    # train.features.Feature the loop calls (made by train())
    layouts: list = field(default_factory=list)     # dataset.Layout of each Item.group: its batch size

    @property
    def train_te(self) -> bool:
        return bool(self.network.te_parameters())


def prepare(host, cfg: TrainConfig, emit, stop, scan=None) -> Run:
    """Reads the data, plans the epochs, picks precision and schedule (the options and outputs are checked)."""
    scan, report = prepare_data(host, cfg, scan)
    for s in report["skipped"]:
        emit(Event("message", text=f"skipped {s['file']}: {s['reason']}"))
    for w in report["warnings"]:
        emit(Event("message", text=f"warning: {w}"))
    dist = Dist.from_env()
    plan, _, total, epochs = schedule(scan, cfg, dist.world)
    device = next(host.unet.parameters()).device
    messages: list = []
    amp = optim.autocast_dtype(cfg.mixed_precision, device, messages)
    ac = host.alphas_cumprod.detach().float()
    run = Run(host, cfg, report, plan, total, epochs,
              batches.Augment(cfg.flip_aug, cfg.random_crop, cfg),
              dist, device, amp, "v" if cfg.v_parameterization or host.prediction == "v" else "eps",
              zero_terminal_snr(ac) if cfg.zero_terminal_snr else ac,
              emit if dist.main else (lambda e: None), stop, messages)
    run.layouts = scan.layouts
    run.spec = network_args.spec(cfg)
    messages += run.spec.notes
    run.previews = prompts.load(cfg.sample_prompts)
    samplers = sorted({p.sampler for p in run.previews if p.sampler})
    if samplers:
        messages.append(f"sample prompts ask for sampler {', '.join(samplers)}: the previews are drawn with DDIM")
    if cfg.clip_skip > 1 and host.arch.name == "sdxl":
        messages.append(f"clip_skip {cfg.clip_skip} has no effect on SDXL: both text encoders give their "
                        "penultimate layer, as SDXL was trained (kohya and the webui's default do the same)")
    if cfg.zero_terminal_snr and run.prediction == "eps":
        messages.append("zero_terminal_snr is meant for v-prediction: with an eps model the last timestep "
                        "cannot be denoised (kohya: use it with --v_parameterization)")
    if cfg.scale_v_pred_loss_like_noise_pred and run.prediction == "eps":
        messages.append("scale_v_pred_loss_like_noise_pred is meant for v-prediction (kohya refuses it without "
                        "--v_parameterization): on this eps model it scales the loss down at high noise all the same")
    return run


def train(host, cfg: TrainConfig, on_event=None, should_stop=None, scan=None, estimate=None) -> Result:
    """`estimate`: train.memory.estimate(host, cfg) when the caller has made it (it picks the blocks that
    gradient checkpointing recomputes)."""
    cfg.validate()
    check_outputs(cfg)          # before the claim, which creates the output folder
    if Dist.from_env().main:
        with claimed(cfg):
            return _train(host, cfg, on_event, should_stop, scan, estimate)
    return _train(host, cfg, on_event, should_stop, scan, estimate)


def _train(host, cfg: TrainConfig, on_event, should_stop, scan, estimate) -> Result:
    if cfg.vae:
        _own_vae(host, cfg.vae)
    wanted = features.for_run(cfg)
    for feature in wanted:
        feature.before_scan(host, cfg)
    run = prepare(host, cfg, on_event or (lambda e: None), should_stop or (lambda: False), scan)
    run.features = wanted
    if host.pending is not None and not unet_after_encoders(cfg, run.device, run.spec):
        host.pending.read()         # this run needs the UNet's weights from the start (DoRA's modules, say)
    # kohya merges base_weights before it makes the network (DoRA's modules start from the merged weights)
    base = base_weights.merged(host, cfg, lambda text: run.emit(Event("message", text=text)))
    try:
        return _train_network(run, estimate)
    finally:
        if base is not None:
            base.restore(host)


def _train_network(run: Run, estimate) -> Result:
    """The network made, attached inside the host's training session, trained."""
    host, cfg = run.host, run.cfg
    torch.manual_seed(cfg.seed)     # the LoRA's initialisation, then dropout: the same run for the same seed
    run.network = network_for(host, run.spec).to(run.device)
    blocks = _checkpointed_blocks(run, estimate)
    patches = _patches(run)
    for m in run.messages:
        run.emit(Event("message", text=m))
    # under mixed precision the frozen UNet and text encoders compute in its dtype, held so (as kohya does)
    frozen = (frozen_roots(host), run.amp)
    with HostSession(host.model, blocks, patches, frozen):
        run.network.attach()
        try:
            return _run(run)
        finally:
            run.network.detach()


def _own_vae(host, path: str) -> None:
    """kohya's --vae: the command line, which opens a headless run's model, loads the file's VAE into it and says
    so (`host.vae_file`); a host's model is the user's, and its VAE the one chosen there."""
    if host.vae_file == path:
        return
    if not host.disposable:
        raise ValueError("vae: here the model's VAE is the one the webui has loaded: choose the VAE in its settings "
                         "(SD VAE) instead")
    raise ValueError("vae: the command line loads it into the model it opens (python -m lora_ext train --vae)")


def _checkpointed_blocks(run: Run, estimate=None) -> list:
    """The UNet blocks recomputed in backward: none without gradient checkpointing; with it, those the memory
    estimate picks within checkpointing_margin (all where it has no answer)."""
    cfg, blocks = run.cfg, run.host.checkpoint_blocks()
    if not cfg.gradient_checkpointing or not blocks:
        return []
    if cfg.checkpointing_margin > 0:
        from . import memory
        try:
            estimate = estimate or memory.estimate(run.host, cfg)
        except Exception as e:      # advisory: a host the estimate cannot measure recomputes every block
            run.messages.append(f"gradient checkpointing: every block recomputed (no memory estimate: {e})")
            return blocks
        plan = estimate["recomputed"]       # one per block of checkpoint_blocks(), or None
        if plan and not all(plan):
            more = estimate["parts"]["activations"] - estimate["all_recomputed"]
            run.messages.append(f"gradient checkpointing: {sum(plan)} of {len(blocks)} blocks recomputed, the other "
                                f"{len(blocks) - sum(plan)} keep their activations (about {more / 2**20:.0f} MB more, "
                                f"within checkpointing_margin {cfg.checkpointing_margin:g} of the run's memory)")
            return [b for b, again in zip(blocks, plan) if again]
    return blocks


def _patches(run: Run) -> list:
    """The forwards the run installs: faster attention; on the CPU, each frozen layer stored in a half dtype
    (a headless run loads them so when asked for one) computing in fp32, and each frozen convolution on the
    faster CPU kernel for its shape (cpu_conv)."""
    host, cfg = run.host, run.cfg
    patches = host.training_patches()
    if cfg.xformers and patches:
        run.messages.append("xformers is not used here; torch's scaled_dot_product_attention does the same job")
    if run.amp is None and run.device.type == "cpu":
        upcast = upcast_patches(frozen_roots(host))
        if upcast:
            narrow = ", ".join(sorted({str(m.weight.dtype).removeprefix("torch.") for m, _ in upcast}))
            run.messages.append(f"the frozen weights, stored in {narrow}, are cast up to fp32 at each use (half "
                                "their memory at the CPU's fp32 speed)")
        patches = list(patches) + upcast
    if run.device.type == "cpu":
        run.convs = Chooser()
        taken = {id(m) for m, _ in patches}     # a layer cast up at use keeps that forward
        patches = list(patches) + [p for p in conv_patches(host.unet, run.convs) if id(p[0]) not in taken]
    return patches


def _optimizer(run: Run):
    lrs = run.spec.lrs
    groups = [{"params": run.network.parameters_of(c), "lr": lrs[c]} for c in ("unet", "te", "te1", "te2")]
    groups = [g for g in groups if g["params"] and g["lr"] > 0]
    if not groups:
        raise ValueError("nothing to train: both the UNet and the text encoder learning rates are 0")
    return optim.make_optimizer(run.cfg.optimizer_type, groups, run.cfg.optimizer_args, run.messages)


def _caches(run: Run) -> None:
    """Latents are cached the first time a batch needs them, so the first step comes after one encode, not
    after the whole dataset's; text-encoder outputs likewise, per caption."""
    cfg, host = run.cfg, run.host
    if cfg.cache_latents:
        # what the latents depend on besides the image, its bucket and flip: the VAE's weights, the latent
        # scale, the encode's precision (a cache beside the images made for another model is not used)
        made_by = f"{fingerprint([host.vae])}:{host.latent_scale:g}" + (":bf16" if step_math.vae_in_bf16(run) else "")
        run.latent_cache = batches.LatentCache(lambda px: step_math.encode_images(run, px, [cfg.seed] * len(px)),
                                               to_disk=cfg.cache_latents_to_disk, precision=made_by)
    if cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk:
        # beside the states (in the webui models/lora_ext_states, out of the LoRA folder), else the output's
        folder = (os.path.join(cfg.state_dir or cfg.output_dir, "text-cache")
                  if cfg.cache_text_encoder_outputs_to_disk else None)
        # under mixed precision the encoders compute in its dtype (their weights are held in it): so the cache
        settings = f"{fingerprint(host.text_encoders())}:{cfg.clip_skip}:{cfg.max_token_length}" + (f":{run.amp}" if run.amp else "")

        def encode(captions):
            with step_math.autocast(run.device, run.amp):
                return host.encode_text(captions, cfg.clip_skip, cfg.max_token_length)
        run.text_cache = TextCache(encode, settings, folder)


def _run(run: Run) -> Result:
    cfg, dist = run.cfg, run.dist
    run.optimizer = _optimizer(run)
    _caches(run)
    loop = _Loop(run)
    if cfg.network_weights:
        left = run.network.load_stored(files.read(cfg.network_weights, run.host.arch).modules)
        if left:
            run.emit(Event("message", text=f"network_weights: {len(left)} modules start from zero instead (another "
                                           f"type, rank layout or layer than this run trains; e.g. {left[0]})"))
    if cfg.resume:
        loop.step, epoch0, batch0, loop.losses = _load_state(cfg.resume, run.network, run.optimizer, run.features)
        loop.at = (epoch0, batch0)
        if loop.step >= run.total:
            raise state.StateError(f"resume: {cfg.resume} is at step {loop.step}, and this run has {run.total} "
                                   "steps: raise max_train_steps (or max_train_epochs) to train on from it")
        run.emit(Event("message", text=f"resumed at step {loop.step} (epoch {epoch0 + 1})"))
    if cfg.lr_scheduler_type:
        run.scheduler = _scheduler(run, loop.base_lrs, loop.step)
    placed = {part: next(part.parameters()).device for part in (run.host.vae, *run.host.text_encoders())}
    try:
        loop.run(run.epochs)
    except Exception:
        # a crash (out of memory, a bad image, a full disk) keeps the steps done: the LoRA and a state at
        # the last whole step, from which --resume redoes the lost micro-batches
        if loop.step > loop.done_at_start and dist.main:
            loop.rescue()
        raise
    for part, device in placed.items():
        part.to(device)
    summary = run.convs.summary() if run.convs is not None else None
    if summary:
        run.messages.append(summary)
    lora_path = loop.save(loop.out_path) if dist.main else None
    state_path = None
    if (loop.cancelled or cfg.save_state or cfg.save_state_on_train_end) and dist.main:
        state_path = loop.save_state(loop.at)
    run.emit(Event("cancelled" if loop.cancelled else "done", loop.step, run.total, loop.epoch + 1,
                   paths=[lora_path] + ([state_path] if state_path else [])))
    return Result(lora_path, state_path, loop.step, loop.cancelled, loop.losses, run.report, run.messages)


class _Loop:
    """The optimizer steps of one run and what they carry between them: the step count, where a resume
    would continue (`at`: epoch, batch after the last step), the losses."""

    def __init__(self, run: Run):
        self.r = run
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
        self.scaler = torch.amp.GradScaler("cuda", enabled=run.amp == torch.float16)
        self.base_lrs = [g["lr"] for g in run.optimizer.param_groups]
        self.step, self.at, self.epoch, self.losses, self.micro_losses = 0, (0, 0), 0, [], []
        self.cancelled = False
        self.needed = {(s.item.path, s.bucket) for batch in run.plan(0) for s in batch}
        self.captions = {batches.caption_of(s, run.aug) for batch in run.plan(0) for s in batch}
        self.encoders_leave = encoders_leave(run.host, run.cfg, run.train_te, run.device)
        self.vae_leaves = vae_leaves(run.host, run.cfg, run.device)
        # each process of a multi-process run caches only its own share: none sees them all
        self.latents_cached = run.latent_cache is None or run.dist.world > 1
        self.latents_done = 0           # of the needed images, those whose latents are cached (while caching)
        self.out_path = os.path.join(run.cfg.output_dir, f"{run.cfg.output_name}.safetensors")

    def run(self, epochs: int) -> None:
        self._free_decoder()
        if self.encoders_leave:
            self._encode_captions_first()
        self._read_pending()
        self.epoch = self.at[0]
        for feature in self.r.features:
            feature.at_start(self)
        self.started, self.done_at_start = time.perf_counter(), self.step
        for epoch in range(self.at[0], epochs):
            self.epoch = epoch
            whole = self._epoch(epoch, skip=self.at[1] if epoch == self.at[0] else 0)
            if self.cancelled:
                return
            if whole:       # a run that ends inside an epoch resumes inside it (more steps asked for later)
                self.at = (epoch + 1, 0)
            last = self.step >= self.r.total
            for feature in self.r.features:
                feature.after_epoch(self, epoch, last)
            if last:
                return

    def _epoch(self, epoch: int, skip: int) -> bool:
        """The epoch's batches from `skip` on; whether it went through all of them."""
        cfg, batches_of_epoch, micro = self.r.cfg, self.r.plan(epoch), 0
        for b, batch in enumerate(batches_of_epoch):
            if b < skip:
                continue
            if self.step >= self.r.total:
                return False
            if self.r.dist.any(self.r.stop()):
                self.cancelled = True
                return False
            self._backward(batch)
            micro += 1
            if micro % cfg.gradient_accumulation_steps and b + 1 < len(batches_of_epoch):
                continue
            micro = 0
            factor = _optimizer_step(self.r, self.scaler, self.base_lrs, self.step)
            self.step, self.at = self.step + 1, (epoch, b + 1)
            self._after_step(epoch, factor)
        return True

    def _backward(self, batch) -> None:
        cfg, dist = self.r.cfg, self.r.dist
        local = dist.local(batch, self.r.layouts[batch[0].item.group].batch_size)
        loss_sum = step_math.loss_sum(self.r, local, self.step) if local else None
        if loss_sum is not None:
            self.scaler.scale(loss_sum / (len(batch) * cfg.gradient_accumulation_steps)).backward()
        self.micro_losses.append(dist.sum(float(loss_sum.detach()) if loss_sum is not None else 0.0) / len(batch))
        self._offload_encoders()

    def _encode_captions_first(self) -> None:
        """Every caption encoded before the first step, so that the text encoders are gone before any step's
        memory is taken (as kohya's caching does); sorted, the same order for the same data. A cancel here
        leaves the rest to the steps, which then stop at once."""
        for caption in sorted(self.captions):
            if self.r.stop():
                return
            self.r.text_cache.get([caption])
        self._offload_encoders()
        where = {"offloaded": "moved to the CPU", "freed": "freed"}[self.encoders_leave]
        self.r.emit(Event("message", text=f"text-encoder outputs cached for {len(self.captions)} captions before "
                                          f"the first step; the text encoders are {where} for the rest of the run"))

    def _read_pending(self) -> None:
        """A headless run's UNet, read from its file now that the text encoders are freed: the two never
        share the memory (leaving.unet_after_encoders). Read also where they were not (a cancel while the
        captions were encoded), without saying so."""
        host, pending = self.r.host, self.r.host.pending
        if pending is None:
            return
        pending.read()
        if all(freed(m) for m in host.text_encoders()):
            self.r.emit(Event("message", text=f"the UNet's weights ({pending.nbytes / 2**30:.2f} GB) are read from "
                                              "the checkpoint after the text encoders are freed (never both in memory)"))

    def _free_decoder(self) -> None:
        parts = [m for m in decoder_parts(self.r.host, self.r.cfg) if not freed(m)]
        for module in parts:
            free(module)
        if parts:
            self.r.emit(Event("message", text="the VAE's decoder is freed for the run (a headless run without "
                                              "previews never decodes)"))

    def _offload_encoders(self) -> None:
        """Once every latent (text output) the run needs is cached, the VAE (text encoders) leave the
        device for the rest of the run, and _run puts them back; a headless run's are freed instead
        (leaving.vae_leaves, encoders_leave)."""
        host = self.r.host
        if not self.latents_cached:
            self.latents_done = len(self.needed & self.r.latent_cache.keys())
            self.latents_cached = self.latents_done == len(self.needed)
            if self.latents_cached and self.vae_leaves == "freed":
                free(host.vae)
                self.r.emit(Event("message", text=f"latents cached for all {len(self.needed)} images: the VAE is "
                                                  "freed for the rest of the run"))
            elif self.latents_cached and self.vae_leaves == "offloaded":
                host.vae.to("cpu")
        text = self.r.text_cache
        if text is not None and not self.r.train_te and self.captions <= text.memory.keys():
            for module in host.text_encoders():
                if self.encoders_leave == "freed":
                    if not freed(module):
                        free(module)
                elif _on_device(module):
                    module.to("cpu")

    def _after_step(self, epoch: int, factor: float) -> None:
        step, losses = self.step, self.losses
        losses.append(sum(self.micro_losses) / len(self.micro_losses))
        self.micro_losses.clear()
        elapsed = time.perf_counter() - self.started
        rate = (step - self.done_at_start) / elapsed if elapsed > 0 else None
        self.r.emit(Event("step", step, self.r.total, epoch + 1, losses[-1], self.average_loss(),
                          self._lr(factor), rate, (self.r.total - step) / rate if rate else None,
                          latents=self._latents_caching()))
        for feature in self.r.features:
            feature.after_step(self, step, epoch)

    def _lr(self, factor: float) -> float:
        """The learning rate the step's update used (the first group's)."""
        base = self.base_lrs[0]
        return base * factor if base is not None else optim.current_lr(self.r.optimizer)

    def _latents_caching(self) -> tuple | None:
        """(images whose latents are cached, images of the run) while some are still to be encoded."""
        return None if self.latents_cached else (self.latents_done, len(self.needed))

    def average_loss(self) -> float | None:
        """Over the last 50 steps: what the progress shows and each save records."""
        recent = self.losses[-50:]
        return sum(recent) / len(recent) if recent else None

    def save(self, path: str) -> str:
        extra = {k: v for f in self.r.features for k, v in f.metadata(self).items()}
        return save_lora(self.r, self.step, self.epoch, path, self.average_loss(), extra)

    def save_state(self, resume_at: tuple) -> str:
        kept = {f.name: f.state() for f in self.r.features}
        return _save_state(self.r.cfg, self.r.network, self.r.optimizer, self.step, *resume_at, self.losses, kept)

    def snapshot(self, suffix: str) -> None:
        """A numbered LoRA (NAME-<suffix>), and with save_state the state to resume from it (so that a kill -9
        loses at most the steps since)."""
        self._snapshot(self.numbered(suffix))

    def numbered(self, suffix: str) -> str:
        return _numbered(self.out_path, suffix)

    def _snapshot(self, path: str) -> None:
        if self.r.dist.main:
            self.save(path)
            if self.r.cfg.save_state:
                self.save_state(self.at)

    def rescue(self) -> None:
        try:
            self.save(self.out_path)
            folder = self.save_state(self.at)
            self.r.emit(Event("message", self.step, text=f"stopped by an error after step {self.step}: saved "
                                                        f"{self.out_path} and the state {folder}; fix the cause "
                                                        "and resume from it"))
        except Exception:       # the disk may be what failed: the original error is the one to report
            pass


def _on_device(module) -> bool:
    return next(module.parameters()).device.type != "cpu"


def _optimizer_step(run: Run, scaler, base_lrs, step: int) -> float:
    """One update from the summed gradients, at the scheduled learning rate (returned as its factor)."""
    cfg, optimizer = run.cfg, run.optimizer
    # lr: what diffusers' polynomial decay divides by (the optimizer's default lr, kohya's learning_rate)
    if run.scheduler is None:
        factor = cfg.lr_at(step, run.total)
        for g, base in zip(optimizer.param_groups, base_lrs):
            if base is not None:        # None: an optimizer that sets its own (Adafactor's relative_step)
                g["lr"] = base * factor
    else:                               # lr_scheduler_type's: it set the rate after the last step
        factor = optimizer.param_groups[0]["lr"] / base_lrs[0] if base_lrs[0] else 1.0
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    run.dist.sum_grads(trained)
    scaler.unscale_(optimizer)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if cfg.scale_weight_norms:
        max_norm.apply(run.network, cfg.scale_weight_norms)
    if run.scheduler is not None:
        run.scheduler.step()
    return factor


def _scheduler(run: Run, base_lrs: list, steps: int):
    """lr_scheduler_type's scheduler, made from the run's own rates and stepped to `steps` (a resumed run):
    it depends on the count of steps alone, so a resumed run keeps the rates of a run never stopped (torch's
    chained schedulers scale the rate they find: the resumed optimizer's is put back first)."""
    import warnings

    for group, base in zip(run.optimizer.param_groups, base_lrs):
        group["lr"] = base
        group.pop("initial_lr", None)
    scheduler = schedules.custom(run.cfg.lr_scheduler_type, run.cfg.lr_scheduler_args, run.optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "step() before optimizer.step()": it is the point here
        for _ in range(steps):
            scheduler.step()
    return scheduler


def _numbered(path: str, suffix: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}-{suffix}{ext}"


# --- resumable state ---------------------------------------------------------------------------------------

def _save_state(cfg, network, optimizer, step, epoch, batch, losses, kept: dict) -> str:
    folder = state.state_folder(cfg.state_dir or cfg.output_dir, cfg.output_name)
    return state.save(folder, network, optimizer, {"step": step, "epoch": epoch, "batch": batch, "losses": losses},
                      kept)


def _load_state(path, network, optimizer, run_features: list):
    counters = state.load(path, network, optimizer)
    kept = counters["features"]
    for feature in run_features:
        if feature.name in kept:
            feature.load_state(*kept[feature.name])
    return counters["step"], counters["epoch"], counters["batch"], list(counters["losses"])
