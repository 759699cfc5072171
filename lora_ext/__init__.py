"""lora_ext: train, apply and merge LoRA networks for Stable Diffusion, inside the webui or headless.

The core is importable without the webui; heavy packages (torch, transformers, diffusers) are imported
inside the functions that need them, so that the webui's start-up pays almost nothing for the extension.
"""
__version__ = "0.1.0"
