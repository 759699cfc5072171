"""Webui glue: registers the LoRA tab, the Additional Networks panel and settings. No logic beyond wiring;
everything here calls lora_ext, which never imports the webui's modules itself."""
import os

from modules import script_callbacks, scripts, shared

from lora_ext.ui import panel, tab


def lora_folder() -> str:
    return getattr(shared.cmd_opts, "lora_dir", None) or os.path.join("models", "Lora")


def on_ui_tabs():
    return [(tab.build_tab(lora_folder), "LoRA", "lora_ext")]


script_callbacks.on_ui_tabs(on_ui_tabs)


class AdditionalNetworks(scripts.Script):
    def title(self):
        return panel.TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return panel.build_panel(is_img2img)
