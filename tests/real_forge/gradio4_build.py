"""Run by test_forge_gradio.py in Forge's venv (gradio 4.40), outside Forge and its gradio patches: builds the
LoRA tab and the panel and prints what the test checks, as JSON."""
import json
import os
import sys

sys.path.insert(0, sys.argv[1])      # the extension's folder
folder = sys.argv[2]

import gradio as gr  # noqa: E402

from lora_ext.library import LoraLibrary  # noqa: E402
from lora_ext.panel import ui as panel  # noqa: E402
from lora_ext.ui.tab import TabContext, build_tab  # noqa: E402
from lora_ext.ui.training_session import TrainingSession  # noqa: E402

os.makedirs(folder, exist_ok=True)
ctx = TabContext(lambda: folder, lambda: folder, LoraLibrary(lambda: [folder]), TrainingSession(lambda *a: None),
                 lambda: None, os.path.join(folder, "presets"), progress_js="loraExtTrain")
tab = build_tab(ctx)
with gr.Blocks() as page:
    built = panel.build_panel(False, 3, lambda: [], lambda n: "", lambda n: None)
images = [c for c in page.blocks.values() if isinstance(c, gr.Image)]
print(json.dumps({"gradio": gr.__version__,
                  "js": [d.get("js") for d in tab.config["dependencies"] if d.get("js")],
                  "mask_sources": [getattr(c, "sources", None) for c in images],
                  "slots": len(built.dropdowns)}))
