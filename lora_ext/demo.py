"""`python -m lora_ext demo`: the standalone walk-through on a tiny model built from configs (no download).

Draws a small two-concept dataset in kohya's folder layout, trains a LoCon on the tiny SD1 model (about
30 s on two CPU cores), and writes into the output folder: the LoRA, its `inspect` report, a loss plot,
and a grid of samples at LoRA weights 0 / 0.5 / 1 with the weight-1 change amplified beside them."""
from __future__ import annotations

import json
import os
import time

from .train.loss_plot import loss_plot


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
    from . import sample_data, tiny
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
