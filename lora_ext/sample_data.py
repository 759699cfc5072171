"""The demo's sample dataset, drawn here rather than shipped: small pictures of two concepts in kohya's
folder layout (`5_redcircle`, `3_bluesquare`), with captions, and a regularization folder."""
from __future__ import annotations

import os
import random


def make_sample_dataset(root: str, size: int = 64, per_concept: int = 4, seed: int = 0) -> dict:
    """Writes train/ and reg/ under `root`; returns their paths."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    train, reg = os.path.join(root, "train"), os.path.join(root, "reg")
    concepts = {"5_redcircle": ("ellipse", (220, 40, 40), "red circle"),
                "3_bluesquare": ("rectangle", (40, 60, 220), "blue square")}
    for folder, (shape, color, words) in concepts.items():
        path = os.path.join(train, folder)
        os.makedirs(path, exist_ok=True)
        for i in range(per_concept):
            image = Image.new("RGB", (size, size), (235, 235, 225))
            draw = ImageDraw.Draw(image)
            r = rng.randint(size // 5, size // 3)
            cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
            getattr(draw, shape)([cx - r, cy - r, cx + r, cy + r], fill=color)
            image.save(os.path.join(path, f"{i:02d}.png"))
            if i != per_concept - 1:      # one image keeps no caption: it gets the concept name
                with open(os.path.join(path, f"{i:02d}.txt"), "w", encoding="utf-8") as f:
                    f.write(f"{words}, simple shape, plain background")
    reg_path = os.path.join(reg, "1_shape")
    os.makedirs(reg_path, exist_ok=True)
    for i in range(2):
        image = Image.new("RGB", (size, size), (rng.randint(100, 200),) * 3)
        image.save(os.path.join(reg_path, f"{i:02d}.png"))
    return {"train": train, "reg": reg}
