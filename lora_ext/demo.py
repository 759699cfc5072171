"""`python -m lora_ext demo`: the standalone walk-through on a tiny model built from configs (no download).

At this stage: build the tiny SD1 model, make a LoCon for every target of it (random, as if trained),
write it as kohya-format safetensors and print what `inspect` reads back."""
from __future__ import annotations

import json
import os

import torch

from . import files, naming
from .describe import describe
from .networks.lora import LoRAModule


def make_random_lora(sd_model, rank: int = 4, alpha: float = 2.0, conv_rank: int | None = 2, seed: int = 0) -> dict:
    """{kohya name: StoredModule} with nonzero weights for every target of `sd_model`."""
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
        m = LoRAModule(layer, r, alpha if t.kind != naming.CONV else 1.0)
        torch.nn.init.normal_(m.lora_up.weight, std=0.01)
        modules[t.kohya] = m.stored()
    return modules


def run_demo(out: str) -> int:
    from .testing import tiny

    os.makedirs(out, exist_ok=True)
    print("building the tiny SD1 model (real ldm UNet, CLIP text encoder, VAE; random weights)...")
    model = tiny.build("sd1")
    arch = naming.arch_from_model(model)
    modules = make_random_lora(model)
    path = os.path.join(out, "demo_locon.safetensors")
    meta = files.network_metadata("locon", 4, 2.0, arch, conv_dim=2, conv_alpha=1.0,
                                  ss_training_comment="lora_ext demo: random weights, not trained")
    files.write_kohya(path, files.kohya_tensors(modules, torch.float16), meta, overwrite=True)
    print(f"wrote {path}")
    print(json.dumps(describe(path, arch), indent=2))
    return 0
