"""Run by the webui at start-up (and safe to run again): installs into the webui's venv only what lora_ext
needs and the webui lacks. Never touches torch: the webui owns its torch build."""
import sys

import launch

# (import name, pip requirement)
NEEDED = [("safetensors", "safetensors")]
if sys.version_info < (3, 11):
    NEEDED.append(("tomli", "tomli"))   # TOML configs; Python 3.11 has tomllib


def missing():
    return [(name, req) for name, req in NEEDED if not launch.is_installed(name)]


for _, req in missing():
    launch.run_pip(f"install {req}", f"{req} for lora_ext")
