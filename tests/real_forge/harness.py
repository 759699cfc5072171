"""The real Stable Diffusion WebUI Forge for tests: a work copy of its source with the extension installed as
users install it, a checkpoint Forge takes for SD1.5 (its loader guesses the family from key shapes and builds
the text encoder and VAE from SD1.5's own configs: tiny.SPECS['sd1-forge'], random weights), LoRA files of
several types, and a server process (the A1111 tier's Server, with Forge's flags).

Where things come from: Forge's source from $LORA_EXT_FORGE, else ../shared/forge/webui beside this checkout
(its helper repositories inside it); its venv from $LORA_EXT_FORGE_PYTHON, else the one .ci/forge-venv builds
(cached, keyed on its requirements)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from real_webui.harness import EXTENSION_IGNORE, ROOT, Unavailable, _make_writable, host_python

# Forge's start-up on a CPU-only machine (../shared/forge/NOTES.md); --server-name: an API start binds 0.0.0.0
# without it
FLAGS = ["--api", "--always-cpu", "--skip-torch-cuda-test", "--skip-prepare-environment", "--skip-install",
         "--skip-version-check", "--skip-python-version-check", "--no-download-sd-model", "--no-hashing",
         "--server-name", "127.0.0.1"]
CHECKPOINT = "forge_sd15.safetensors"
SDXL_CHECKPOINT = "forge_sdxl.safetensors"     # tiny.SPECS['sdxl-forge']: the real text encoders, a reduced UNet
SDXL_LORA = "xl_locon.safetensors"
SDXL_LOHA = "xl_loha.safetensors"
LORA = "alpha.safetensors"              # a LoCon: attention, convs and the text encoder
PLAIN = "plain.safetensors"             # attention and the text encoder only
TYPES = ("loha", "lokr")                # other types, on the layers the built-in finds
# layers we read under their diffusers names that Forge's built-in finds under no name it maps (as A1111's)
BUILTIN_UNMAPPED = ("_conv_norm_out", "_final_layer_norm")


def forge_source() -> str:
    path = os.environ.get("LORA_EXT_FORGE") or os.path.join(ROOT, "..", "shared", "forge", "webui")
    if not os.path.isfile(os.path.join(path, "launch.py")) or not os.path.isdir(os.path.join(path, "backend")):
        raise Unavailable("real-Forge tier skipped: set LORA_EXT_FORGE to a Forge folder (or provide "
                          "../shared/forge/webui) to run it")
    return os.path.abspath(path)


def forge_python(source: str) -> str:
    return host_python(source, "forge-venv", "LORA_EXT_FORGE_PYTHON", "real-Forge", "a few minutes")


def _ignore(source: str):
    top = {"venv", "models", "outputs", "log", "tmp", "config.json", "ui-config.json", ".git", "cache.json",
           "params.txt", "extensions"}

    def ignore(folder, names):
        skip = top if os.path.abspath(folder) == source else set()
        return [n for n in names if n in skip or n == "__pycache__"]
    return ignore


def make_work_copy(work: str, source: str, python: str) -> dict:
    """A writable Forge under `work` with the extension, the probe script, the checkpoints and LoRA files."""
    forge = os.path.join(work, "forge")
    shutil.copytree(source, forge, ignore=_ignore(source), copy_function=shutil.copy)
    os.makedirs(os.path.join(forge, "extensions"))
    _make_writable(forge)
    extension = os.path.join(forge, "extensions", "lora_ext")
    shutil.copytree(ROOT, extension, ignore=EXTENSION_IGNORE)
    shutil.copy(os.path.join(ROOT, "tests", "real_forge", "forge_probe.py"), os.path.join(forge, "scripts"))
    paths = {"webui": forge, "extension": extension, "python": python,
             "checkpoints": os.path.join(forge, "models", "Stable-diffusion"),
             "loras": os.path.join(forge, "models", "Lora")}
    for key in ("checkpoints", "loras"):
        os.makedirs(paths[key], exist_ok=True)
    with open(os.path.join(forge, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"show_progress_type": "Approx cheap"}, f)
    # the models are built in a child process: the gigabytes it takes are given back when it ends, not kept
    # by this one beside Forge's
    tests = os.path.join(ROOT, "tests")
    subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = [{ROOT!r}, {tests!r}]; "
                    f"from real_forge.harness import write_models; write_models({paths!r})"], check=True)
    return paths


def write_models(paths: dict) -> None:
    """The SD1.5 checkpoint Forge takes and LoRAs for it (_write_sd1), the SDXL ones (_write_sdxl)."""
    _write_sd1(paths)
    _write_sdxl(paths)


def _write_sd1(paths: dict) -> None:
    import torch
    from safetensors.torch import save_file

    from lora_ext import files, tiny
    from random_networks import make_random_lora, make_random_network

    model = tiny.build("sd1-forge")
    # fp16 as released checkpoints are (Forge computes in fp32 on the CPU)
    save_file({k: v.to(torch.float16).contiguous() for k, v in model.checkpoint_state_dict().items()},
              os.path.join(paths["checkpoints"], CHECKPOINT))
    for name, conv_rank, seed in ((LORA, 2, 1), (PLAIN, None, 2)):
        modules = make_random_lora(model, rank=4, alpha=2.0, conv_rank=conv_rank, seed=seed)
        files.write_kohya(os.path.join(paths["loras"], name), files.kohya_tensors(modules),
                          {"ss_output_name": os.path.splitext(name)[0]})
    for network in TYPES:
        modules = {n: m for n, m in make_random_network(model, network).items() if not n.endswith(BUILTIN_UNMAPPED)}
        files.write_kohya(os.path.join(paths["loras"], f"{network}.safetensors"), files.kohya_tensors(modules),
                          {"ss_output_name": network})


def _write_sdxl(paths: dict) -> None:
    """The SDXL checkpoint Forge takes (tiny.SPECS['sdxl-forge']) and LoRAs for it: a LoCon on both text
    encoders and the UNet, and a LoHa."""
    import torch
    from safetensors.torch import save_file

    from lora_ext import files, tiny
    from random_networks import make_random_lora, make_random_network

    model = tiny.build("sdxl-forge")
    save_file({k: v.to(torch.float16).contiguous() for k, v in model.checkpoint_state_dict().items()},
              os.path.join(paths["checkpoints"], SDXL_CHECKPOINT))
    files.write_kohya(os.path.join(paths["loras"], SDXL_LORA),
                      files.kohya_tensors(make_random_lora(model, rank=4, alpha=2.0, conv_rank=2, seed=4)),
                      {"ss_output_name": SDXL_LORA[:-12]})
    modules = {n: m for n, m in make_random_network(model, "loha").items() if not n.endswith(BUILTIN_UNMAPPED)}
    files.write_kohya(os.path.join(paths["loras"], SDXL_LOHA), files.kohya_tensors(modules),
                      {"ss_output_name": SDXL_LOHA[:-12]})
