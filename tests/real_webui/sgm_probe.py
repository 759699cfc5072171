"""Run by the webui's own python (the real-webui tier): sgm's SDXL classes, as the webui instantiates them
from a checkpoint's yaml, against lora_ext's conditioning and prediction on the same tiny SDXL checkpoint.
Prints the largest differences as JSON. argv: checkpoint, open_clip config folder, repositories..."""
import json
import sys

checkpoint, openclip_folder, *repos = sys.argv[1:]
sys.path[:0] = repos

import open_clip  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from sgm.util import instantiate_from_config  # noqa: E402

from lora_ext.hosts.checkpoint import load_checkpoint  # noqa: E402
from lora_ext.hosts.conditioning import Size  # noqa: E402
from lora_ext.hosts.webui import WebuiHost  # noqa: E402

open_clip.add_model_config(openclip_folder)
sgm = instantiate_from_config(OmegaConf.load(checkpoint.rsplit(".", 1)[0] + ".yaml").model).eval()
sgm.load_state_dict(load_file(checkpoint), strict=False)
for embedder in sgm.conditioner.embedders:
    if hasattr(embedder, "device"):
        embedder.device = "cpu"     # sgm's default is cuda
host = WebuiHost(load_checkpoint(checkpoint))     # lora_ext's headless reading of the same file

prompts = ["a red cat, sitting on a mat", "blue"]
sizes = [Size((96, 80), (8, 0), (64, 64)), Size.plain(64, 64)]
batch = {"txt": prompts, **{key: torch.tensor([getattr(s, attr) for s in sizes], dtype=torch.float32)
                            for key, attr in (("original_size_as_tuple", "original_hw"),
                                              ("crop_coords_top_left", "crop_top_left"),
                                              ("target_size_as_tuple", "target_hw"))}}
g = torch.Generator().manual_seed(0)
x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
with torch.no_grad():
    theirs, zero = sgm.conditioner(batch), sgm.conditioner(batch, force_zero_embeddings=["txt"])
    text = host.encode_text(prompts)
    ours, ours_zero = host.condition(text, sizes), host.condition(text.zeros(), sizes)
    pred_sgm = sgm.model.diffusion_model(x, t, context=theirs["crossattn"], y=theirs["vector"])
    pred_ours = host.predict(x, t, ours)
print(json.dumps({
    "crossattn": (theirs["crossattn"] - ours.crossattn).abs().max().item(),
    "vector": (theirs["vector"] - ours.vector(host.size_dim)).abs().max().item(),
    "zero_vector": (zero["vector"] - ours_zero.vector(host.size_dim)).abs().max().item(),
    "zero_crossattn": (zero["crossattn"] - ours_zero.crossattn).abs().max().item(),
    "prediction": (pred_sgm - pred_ours).abs().max().item(), "prediction_scale": pred_sgm.abs().mean().item(),
    "vector_width": theirs["vector"].shape[1], "size_dim": host.size_dim}))
