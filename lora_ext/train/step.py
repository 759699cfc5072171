"""The loss of one micro-batch, host-agnostic: latents (cached or encoded), the UNet's conditioning (text,
cached or encoded, and for SDXL each image's sizes), noise at a random timestep, the host's prediction,
the denoising loss against the target of the model's parameterization."""
from __future__ import annotations

import torch

from . import batches, losses


def sample_rng(sample, salt: int) -> torch.Generator:
    # every random draw of a sample comes from its own seed (set by the epoch plan): the same whichever
    # process takes it, and whether the run was resumed or not
    return torch.Generator().manual_seed((sample.seed ^ salt) & (2 ** 62 - 1))


def autocast(device, dtype):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def vae_in_bf16(run) -> bool:
    """Under a bf16 run the VAE computes in bf16 (as kohya's; half the encode's time on a CPU, and bf16 keeps
    fp32's range) unless no_half_vae; never under fp16 autocast (the SD VAEs overflow fp16): there, as without
    autocast, in the VAE's own dtype."""
    return run.amp == torch.bfloat16 and not run.cfg.no_half_vae


def encode_images(run, px, seeds) -> torch.Tensor:
    with torch.no_grad(), autocast(run.device, torch.bfloat16 if vae_in_bf16(run) else None):
        return run.host.encode_images(px, seeds).float()


def latents_of(run, batch, flips) -> torch.Tensor:
    if run.latent_cache is not None:
        return torch.stack([run.latent_cache.get(s, run.aug, f) for s, f in zip(batch, flips)])
    px = torch.stack([batches.pixels(s, run.aug) for s in batch])
    return encode_images(run, px, [s.seed ^ 0x5EED for s in batch])


def cond_of(run, batch, flips, step: int = 0):
    """The conditioning of the micro-batch (with gradients through the text encoders they are trained);
    `step`: the optimizer steps done (kohya's token warm-up)."""
    cfg, host = run.cfg, run.host
    captions = [batches.caption_of(s, run.aug, step, run.total) for s in batch]
    if run.text_cache is not None:
        text = run.text_cache.get(captions)
    else:
        with torch.set_grad_enabled(run.train_te), autocast(run.device, run.amp):
            text = host.encode_text(captions, cfg.clip_skip, cfg.max_token_length)
    return host.condition(text, [batches.size_of(s, run.aug, f) for s, f in zip(batch, flips)])


def noise_and_timesteps(run, batch, latents):
    """Each sample's noise (with kohya's offset and pyramid options: train.losses), what the noisy latents get
    beyond it (input perturbation, or zeros), and its timestep."""
    cfg, noise, extra, t = run.cfg, [], [], []
    high = min(cfg.max_timestep, len(run.ac))
    # the latents' channel means leave the device only where the noise depends on them
    means = (latents.detach().float().mean(dim=(2, 3)).cpu() if cfg.adaptive_noise_scale is not None
             else [None] * len(batch))
    for s, channel_means in zip(batch, means):
        g = sample_rng(s, 0x0015E)
        n = losses.offset_noise(torch.randn(latents.shape[1:], generator=g), g, cfg, channel_means)
        noise.append(n)
        t.append(torch.randint(cfg.min_timestep, high, (1,), generator=g))
        extra.append(losses.perturbation(n, g, cfg))
    return torch.stack(noise).to(run.device), torch.stack(extra).to(run.device), torch.cat(t)


def loss_sum(run, batch, step: int = 0) -> torch.Tensor:
    """The summed denoising loss of the samples: noise added at a random timestep, predicted, compared (kohya's
    loss type, its SNR weights; regularization images weighted by prior_loss_weight)."""
    cfg, device = run.cfg, run.device
    flips = [batches.flipped(s, run.aug) for s in batch]
    latents = latents_of(run, batch, flips).to(device)
    cond = cond_of(run, batch, flips, step)
    noise, extra, t = noise_and_timesteps(run, batch, latents)
    a = run.ac[t].to(device).view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * (noise + extra)
    target = noise if run.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * latents
    with autocast(device, run.amp):
        pred = run.host.predict(noisy, t.to(device), cond)
    huber_c = losses.huber_threshold(cfg, t, run.ac)
    per_sample = losses.elementwise(pred.float(), target.float(), cfg.loss_type, huber_c).mean(dim=(1, 2, 3))
    per_sample = losses.snr_weighted(per_sample, a, cfg, run.prediction == "v")
    weights = torch.tensor([cfg.prior_loss_weight if s.item.is_reg else 1.0 for s in batch], device=device)
    return (per_sample * weights).sum()
