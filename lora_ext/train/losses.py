"""kohya's noise and loss options, as pure functions of one micro-batch (the formulas of its train_util and
custom_train_functions, written from their description):
- noise: an offset per channel (`noise_offset`, a random share of it with `noise_offset_random_strength`,
  grown by the latent's channel mean with `adaptive_noise_scale`), pyramid noise (`multires_noise_*`), and
  input perturbation (`ip_noise_gamma`: more noise in the noisy latents than in the target);
- the element-wise loss: l2, l1, huber or smooth_l1 with a threshold per timestep (`huber_schedule`: snr,
  exponential or constant; `huber_c`, `huber_scale`);
- weights per sample by the timestep's SNR: min-SNR, `scale_v_pred_loss_like_noise_pred`,
  `v_pred_like_loss`, `debiased_estimation_loss`, in kohya's order."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def offset_noise(noise, g, cfg, channel_means=None) -> torch.Tensor:
    """One sample's noise [C, H, W] with the offset (and pyramid) kohya adds; `channel_means` [C]: the
    sample's latent's mean per channel (adaptive_noise_scale only)."""
    if cfg.noise_offset:
        offset = cfg.noise_offset
        if cfg.noise_offset_random_strength:
            offset = torch.rand(1, generator=g).item() * offset
        if cfg.adaptive_noise_scale is not None:
            offset = (offset + cfg.adaptive_noise_scale * channel_means.abs().view(-1, 1, 1)).clamp_min(0)
        noise = noise + offset * torch.randn(noise.shape[:1] + (1, 1), generator=g)
    if cfg.multires_noise_iterations:
        noise = pyramid(noise, g, cfg.multires_noise_iterations, cfg.multires_noise_discount)
    return noise


def pyramid(noise, g, iterations: int, discount: float) -> torch.Tensor:
    """Noise at smaller and smaller random scales (each 2 to 4 times the last) upsampled and added with
    weights discount^i, then brought back to unit deviation (kohya over the batch, here over the sample)."""
    c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = torch.rand(1, generator=g).item() * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        small = torch.randn(1, c, hn, wn, generator=g)
        out += F.interpolate(small, size=(h, w), mode="bilinear")[0] * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def perturbation(noise, g, cfg) -> torch.Tensor:
    """What the noisy latents get beyond the target's noise (`ip_noise_gamma`), or zeros."""
    if not cfg.ip_noise_gamma:
        return torch.zeros_like(noise)
    strength = cfg.ip_noise_gamma
    if cfg.ip_noise_gamma_random_strength:
        strength = torch.rand(1, generator=g).item() * strength
    return strength * torch.randn(noise.shape, generator=g)


def huber_threshold(cfg, t, ac) -> torch.Tensor | None:
    """kohya's huber_c per sample for `t` (None for l2 / l1)."""
    if cfg.loss_type not in ("huber", "smooth_l1"):
        return None
    if cfg.huber_schedule == "exponential":
        alpha = -math.log(cfg.huber_c) / len(ac)
        return torch.exp(-alpha * t.float()) * cfg.huber_scale
    if cfg.huber_schedule == "snr":
        a = ac[t.cpu()].float()
        sigmas = ((1.0 - a) / a) ** 0.5
        return (1 - cfg.huber_c) / (1 + sigmas) ** 2 + cfg.huber_c
    return torch.full(t.shape, cfg.huber_c * cfg.huber_scale)


def elementwise(pred, target, loss_type: str, huber_c=None) -> torch.Tensor:
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = huber_c.to(pred.device).view(-1, *([1] * (pred.ndim - 1)))
    smooth = 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
    return c * smooth if loss_type == "huber" else smooth


def snr_weighted(per_sample, a, cfg, v_prediction: bool) -> torch.Tensor:
    """The per-sample loss times kohya's SNR weights (`a`: alphas_cumprod at each sample's timestep)."""
    snr = (a / (1 - a)).view(-1)
    if cfg.min_snr_gamma:
        # the last timestep of a zero-terminal-SNR schedule has SNR 0, where the weight's limit is 1 (eps)
        s = snr.clamp_min(1e-12)
        clipped = torch.clamp(s, max=cfg.min_snr_gamma)
        per_sample = per_sample * (clipped / (s + 1) if v_prediction else clipped / s)
    capped = torch.minimum(snr, torch.full_like(snr, 1000))     # kohya: SNR at t=0 is inf, held at 1000
    scale = capped / (capped + 1)
    if cfg.scale_v_pred_loss_like_noise_pred:
        per_sample = per_sample * scale
    if cfg.v_pred_like_loss:
        per_sample = per_sample + per_sample / scale * cfg.v_pred_like_loss
    if cfg.debiased_estimation_loss:
        per_sample = per_sample * (1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped))
    return per_sample
