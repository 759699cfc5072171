"""Preview images during training: deterministic DDIM (eta 0) with classifier-free guidance, through the
host's own predict/decode, from the host's noise schedule."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample_image(host, prompt: str, seed: int, steps: int = 20, cfg_scale: float = 7.0, size=(512, 512),
                 negative: str = "", clip_skip: int = 1, max_tokens: int = 75, schedule=None):
    """`schedule`: (alphas_cumprod, 'eps' | 'v') when the run's differ from the host's (zero terminal SNR,
    --v_parameterization). SDXL: conditioned on the image's own size, an empty negative prompt as zeros
    (sgm's force_zero_embeddings, what the webui does)."""
    import numpy as np
    from PIL import Image

    from ..hosts.conditioning import Size, Text

    text = host.encode_text([negative, prompt], clip_skip, max_tokens)
    if not negative and text.pooled is not None:
        text = Text.cat([text.rows(slice(0, 1)).zeros(), text.rows(slice(1, 2))])
    cond = host.condition(text, [Size.plain(*size)] * 2)
    ac, prediction = schedule or (host.alphas_cumprod, host.prediction)
    ac = ac.detach().float().cpu().clamp_min(1e-8)         # a zero-terminal-SNR schedule ends at 0
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(1, 4, size[1] // 8, size[0] // 8, generator=g)
    ts = torch.linspace(len(ac) - 1, 0, steps).round().long()
    for i, t in enumerate(ts):
        a = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        out = host.predict(torch.cat([x, x]), torch.stack([t, t]), cond).float().cpu()
        uncond, c = out.chunk(2)
        out = uncond + cfg_scale * (c - uncond)
        if prediction == "v":
            eps, x0 = a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out
        else:
            eps, x0 = out, (x - (1 - a).sqrt() * out) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    image = host.decode_latents(x)[0].float().cpu()
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))
