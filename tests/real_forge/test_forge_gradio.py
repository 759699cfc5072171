"""The tab and the panel build under Forge's gradio (4.40) by themselves, outside Forge and the patches its
gradio_extensions.py applies (another fork may not have them): the gradio 3/4 differences are ours to bridge
(lora_ext/ui/gradio_compat.py)."""
import json
import os
import subprocess

from real_webui.harness import ROOT, clean_env


def test_the_tab_and_panel_build_under_gradio_4_without_forges_patches(forge_work, tmp_path):
    script = os.path.join(ROOT, "tests", "real_forge", "gradio4_build.py")
    done = subprocess.run([forge_work["python"], script, ROOT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=clean_env(), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["gradio"].startswith("4.")
    assert said["js"] == ["loraExtTrain"]                 # the Train click still asks for its task id
    assert said["mask_sources"] == [["upload"]] * 3 and said["slots"] == 3     # a mask per slot
