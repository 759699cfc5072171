"""`python -m lora_ext demo`: the standalone walk-through on a tiny model built from configs (no download).

Draws a small two-concept dataset in kohya's folder layout, trains a LoCon on the tiny SD1 model (about
30 s on two CPU cores), and writes into the output folder: the LoRA, its `inspect` report, a loss plot,
and a grid of samples at LoRA weights 0 / 0.5 / 1 with the weight-1 change amplified beside them."""
from __future__ import annotations

import json
import math
import os
import time

import torch

from . import naming
from .networks.kinds.lora import LoRAModule
from .networks.kinds.trainable import Geometry
from .networks.stored import StoredModule
from .train.loss_plot import loss_plot


def make_random_lora(sd_model, rank: int = 4, alpha: float = 2.0, conv_rank: int | None = 2, seed: int = 0) -> dict:
    """{kohya name: StoredModule} with nonzero weights for every target of `sd_model` (tests, benchmarks)."""
    torch.manual_seed(seed)
    modules = {}
    for t in naming.targets(naming.arch_from_model(sd_model)):
        if t.locon and conv_rank is None:
            continue
        layer = sd_model.get_submodule(t.webui)
        if t.qkv is not None:
            dim = layer.embed_dim
            layer = torch.nn.Linear(dim, dim, bias=False)
        r = conv_rank if t.kind == naming.CONV else rank
        m = LoRAModule(Geometry.of(layer), r, alpha if t.kind != naming.CONV else 1.0)
        torch.nn.init.normal_(m.lora_up.weight, std=0.01)
        modules[t.kohya] = StoredModule.of(m)
    return modules


def make_random_dora(sd_model, seed: int = 3) -> dict:
    """make_random_lora's LoCon with a DoRA magnitude (`dora_scale`, one per input channel) near the merged
    weight's own column norms, so that the decomposition changes the result (tests, benchmarks)."""
    from .hosts import for_model

    targets = for_model(sd_model).lora_targets()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in make_random_lora(sd_model, rank=4, alpha=4.0, conv_rank=2, seed=seed).items():
        w0 = targets[name].weight.detach().float()
        norms = (w0 + m.delta(w0.shape)).transpose(0, 1).reshape(w0.shape[1], -1).norm(dim=1)
        magnitude = (norms * (1 + 0.2 * torch.rand(norms.shape, generator=g))).reshape(1, -1, *[1] * (w0.ndim - 2))
        out[name] = StoredModule("lora", {**m.parts, "dora_scale": magnitude}, m.alpha)
    return out


def sample_grid(host, lora_path: str, prompt: str, weights, path: str, size=(64, 64), seed: int = 1,
                amplify: int = 0) -> list:
    """Samples at each LoRA weight side by side; returns each one's mean pixel difference from the first.
    With `amplify`, a last tile shows |last - first| times that, so that a change the eye would miss shows."""
    from PIL import Image

    from .apply import Engine, Request
    from .train.sampling import sample_image

    engine = Engine()
    tiles = []
    try:
        for w in weights:
            engine.apply(host, [Request(lora_path, w, w)])
            tiles.append(sample_image(host, prompt, seed, steps=20, size=size).resize((size[0] * 2, size[1] * 2)))
    finally:
        engine.restore(host)
    import numpy as np
    first = np.asarray(tiles[0], dtype=np.float64)
    diffs = [float(np.abs(np.asarray(t, dtype=np.float64) - first).mean()) for t in tiles]
    shown = list(tiles)
    if amplify:
        delta = np.abs(np.asarray(tiles[-1], dtype=np.float64) - first) * amplify
        shown.append(Image.fromarray(np.clip(delta, 0, 255).astype("uint8")))
    grid = Image.new("RGB", (sum(t.width for t in shown), shown[0].height), "white")
    x = 0
    for t in shown:
        grid.paste(t, (x, 0))
        x += t.width
    grid.save(path)
    return diffs


DEMO_STEPS = 60
AMPLIFY = 8


def run_demo(out: str) -> int:
    from .tools.describe import describe
    from .hosts import for_model
    from .testing import sample_data, tiny
    from .train.config import TrainConfig
    from .train.loop import train
    from .train.progress import TqdmProgress

    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    print("building the tiny SD1 model (real ldm UNet, CLIP text encoder, VAE; random weights)...")
    host = for_model(tiny.build("sd1"))
    data = sample_data.make_sample_dataset(os.path.join(out, "data"))
    cfg = TrainConfig(pretrained_model_name_or_path="tiny-sd1", train_data_dir=data["train"],
                      reg_data_dir=data["reg"], caption_extension=".txt", output_dir=out, output_name="demo_lora",
                      overwrite=True, resolution="64", train_batch_size=2, max_train_steps=DEMO_STEPS, network_dim=8,
                      network_alpha=8, network_args=["conv_dim=4", "conv_alpha=4"], learning_rate=1e-2,
                      lr_scheduler="cosine", lr_warmup_steps=5, cache_latents=True, mixed_precision="no",
                      save_precision="fp16", training_comment="lora_ext demo on a tiny random model", seed=1)
    result = train(host, cfg, on_event=TqdmProgress())
    report = describe(result.lora_path, host.arch)
    with open(os.path.join(out, "demo_lora.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    loss_plot(result.losses, os.path.join(out, "loss.png"))
    diffs = sample_grid(host, result.lora_path, "red circle, simple shape, plain background", (0.0, 0.5, 1.0),
                        os.path.join(out, "samples_w0_w05_w1.png"), amplify=AMPLIFY)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    print(json.dumps({k: report[k] for k in ("format", "arch", "network", "modules", "by_kind", "addnet_hash")}, indent=2))
    print(f"loss: first 10 steps {first:.4f}, last 10 steps {last:.4f}")
    print("samples (a random tiny model draws noise; the LoRA changes it): mean pixel difference from weight 0: "
          f"weight 0.5: {diffs[1]:.1f}, weight 1: {diffs[2]:.1f} (of 255); the grid's last tile is the weight-1 "
          f"change, {AMPLIFY}x")
    print(f"wrote {result.lora_path}, demo_lora.json, loss.png, samples_w0_w05_w1.png in {out} "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


def make_random_network(sd_model, network: str, seed: int = 5, conv: bool = True) -> dict:
    """{kohya name: StoredModule} of one type with random nonzero weights on every Linear / Conv target of
    `sd_model` (its Conv2d layers, 1x1 ones too, only with `conv`), for tests and benchmarks: 'lora', 'loha' and
    'lokr' from their trained modules (rank 4), 'ia3' (per output channel), 'oft' and 'boft' (blocks of 4; BOFT
    2 stages), 'glora' (LyCORIS's layout, rank 4) and 'glora_v1' (the first GLoRA layout; Linear and 1x1 only);
    'full' (diff, and diff_b where the layer has a bias) also on the UNet's conv_in / conv_out / embeddings, and
    'norm' on every norm layer."""
    from .hosts import for_model

    host = for_model(sd_model)
    g = torch.Generator().manual_seed(seed)
    out = {}
    targets = host.applied_targets() if network in ("full", "norm") else host.lora_targets()
    for name, bound in targets.items():
        if (len(bound.shape) == 4 and not conv) or bound.target.qkv is not None or bound.owner is not None:
            continue
        if (bound.target.kind == naming.NORM) != (network == "norm"):
            continue
        parts = _random_parts(network, bound.shape, g, bound.bias())
        if parts is not None:
            out[name] = StoredModule.from_parts(parts)
    return out


def _random_parts(network: str, shape: tuple, g, bias=None) -> dict | None:
    from .networks.kinds import BY_NAME

    noise = lambda *s: torch.randn(s, generator=g) * 0.1  # noqa: E731
    out = shape[0]
    if network in ("full", "norm"):
        w, b = ("diff", "diff_b") if network == "full" else ("w_norm", "b_norm")
        return {w: noise(*shape), **({b: noise(*bias.shape)} if bias is not None else {})}
    if network == "ia3":
        return {"weight": noise(out), "on_input": torch.tensor(0)}
    if network in ("oft", "boft"):
        if out % 8:
            return None
        blocks = noise(out // 4, 4, 4) if network == "oft" else noise(2, out // 4, 4, 4)
        return {"oft_blocks": blocks, "alpha": torch.tensor(0.0)}
    if network.startswith("glora"):
        return _random_glora(shape, network == "glora_v1", noise)
    conv = dict(stride=1, padding=1, dilation=1) if len(shape) == 4 else None
    module = BY_NAME[network].trainable()(Geometry(tuple(shape), conv), 4, 2.0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return {**StoredModule.of(module).parts, "alpha": module.alpha.clone()}


def _random_glora(shape: tuple, first_layout: bool, noise) -> dict | None:
    out, inp, flat = shape[0], shape[1], math.prod(shape[1:])
    if first_layout:        # a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r]
        if flat != inp:
            return None
        return {"a1.weight": noise(4, inp), "a2.weight": noise(inp, 4), "b1.weight": noise(4, inp),
                "b2.weight": noise(out, 4), "alpha": torch.tensor(4.0)}
    kernel = tuple(shape[2:])       # a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in, kh, kw]
    ones = (1,) * len(kernel)
    return {"a1.weight": noise(inp, 4, *ones), "a2.weight": noise(4, inp, *ones), "b1.weight": noise(out, 4, *ones),
            "b2.weight": noise(4, inp, *kernel), "alpha": torch.tensor(2.0)}
