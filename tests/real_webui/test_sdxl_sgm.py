"""lora_ext's SDXL conditioning against sgm's own classes (the code the webui runs SDXL with): the webui's
python builds sgm's DiffusionEngine from a tiny SDXL checkpoint's yaml, as the webui does, and compares its
GeneralConditioner (CLIP-L, OpenCLIP bigG, the three ConcatTimestepEmbedderND) and UNet with ours."""
import json
import os
import subprocess

from . import harness


def test_sdxl_conditioning_and_prediction_equal_sgms(work, tmp_path):
    paths = harness.sdxl_files(str(tmp_path))
    repos = [os.path.join(work["webui"], "repositories", name) for name in ("generative-models", "stable-diffusion-stability-ai")]
    env = harness.clean_env()
    env["PYTHONPATH"] = harness.ROOT
    out = subprocess.run([work["python"], os.path.join(harness.ROOT, "tests", "real_webui", "sgm_probe.py"),
                          paths["checkpoint"], paths["openclip"], *repos], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = json.loads(out.stdout.strip().splitlines()[-1])
    assert diffs["vector_width"] == 64 + 6 * 16 and diffs["size_dim"] == 16
    for key in ("crossattn", "vector", "zero_vector", "zero_crossattn"):
        assert diffs[key] < 1e-6, diffs
    assert diffs["prediction"] < 1e-5 * max(1.0, diffs["prediction_scale"]), diffs
