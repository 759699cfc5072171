"""kohya's --vae: a VAE file in the ldm layout (with or without a checkpoint's prefix) or in diffusers' layout
(checked against diffusers' own converter) loads into a headless run's model; a host's model keeps the VAE
its user chose."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_model
from lora_ext.hosts.vae_file import VaeFileError, load_into
from lora_ext.hosts.webui import WebuiHost


def _changed_vae():
    torch.manual_seed(0)
    return {k: (v + 0.01 * torch.randn_like(v)).contiguous() for k, v in tiny_model("sd1").first_stage_model.state_dict().items()}


def _files(tmp_path, weights):
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_vae_checkpoint

    ldm = str(tmp_path / "ldm_vae.safetensors")
    save_file({"first_stage_model." + k: v for k, v in weights.items()}, ldm)
    bare = str(tmp_path / "bare_vae.safetensors")
    save_file(weights, bare)
    folder = tmp_path / "diffusers" / "vae"
    folder.mkdir(parents=True)
    converted = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in weights.items()}, {})
    save_file({k: v.contiguous() for k, v in converted.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return ldm, bare, str(tmp_path / "diffusers")


def test_a_vae_file_in_either_layout_loads_into_the_model(tmp_path):
    weights = _changed_vae()
    for path in _files(tmp_path, weights):
        vae = copy.deepcopy(tiny_model("sd1").first_stage_model)
        assert load_into(vae, path) == len(weights)
        got = vae.state_dict()
        assert all(torch.equal(got[k], weights[k]) for k in weights), path


def test_a_vae_of_another_shape_or_none_is_one_message(tmp_path):
    weights = _changed_vae()
    half = str(tmp_path / "half.safetensors")
    save_file({k: v for i, (k, v) in enumerate(weights.items()) if i % 2}, half)
    with pytest.raises(VaeFileError, match="it lacks .* give a VAE file"):
        load_into(copy.deepcopy(tiny_model("sd1").first_stage_model), half)
    wide = str(tmp_path / "wide.safetensors")
    save_file({k: torch.cat([v, v]) if v.ndim else v for k, v in weights.items()}, wide)
    with pytest.raises(VaeFileError, match="a VAE of another model family"):
        load_into(copy.deepcopy(tiny_model("sd1").first_stage_model), wide)


def test_a_run_takes_its_vae_only_where_the_model_is_its_own(tmp_path):
    from lora_ext.sample_data import make_sample_dataset
    from lora_ext.train.config import from_dict
    from lora_ext.train.loop import train

    weights = _changed_vae()
    ldm, _, _ = _files(tmp_path, weights)
    data = make_sample_dataset(str(tmp_path / "data"), size=64, per_concept=1)
    cfg = from_dict({"train_data_dir": data["train"], "resolution": "64", "max_train_steps": 1, "network_dim": 2,
                     "vae": ldm, "output_dir": str(tmp_path / "out"), "output_name": "v"})
    from lora_ext.cli import own_vae

    with pytest.raises(ValueError, match="choose the VAE in its settings"):
        train(WebuiHost(tiny_model("sd1")), cfg)
    host = WebuiHost(copy.deepcopy(tiny_model("sd1")))
    host.disposable = True          # a headless run's own model, as the command line opens it
    with pytest.raises(ValueError, match="the command line loads it"):
        train(host, cfg)
    own_vae(host, ldm)
    train(host, cfg)
    got = {k: v for k, v in host.vae.state_dict().items() if v.numel()}     # a headless run frees the decoder
    assert "encoder.conv_in.weight" in got and all(torch.equal(v, weights[k]) for k, v in got.items())
