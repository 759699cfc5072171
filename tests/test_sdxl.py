"""SDXL end to end on the tiny SDXL: its conditioning against independent implementations (diffusers' UNet
and pipeline, open_clip's own pooling, diffusers' and ldm's sinusoidal embeddings), training on the webui
layout and on a diffusers folder, and kohya's SDXL options."""
import copy
import os
import types

import pytest
import torch

from conftest import tiny_model
from lora_ext import files
from lora_ext.hosts.conditioning import Cond, Size, Text, sinusoidal
from lora_ext.hosts.webui import WebuiHost
from lora_ext import sample_data, tiny
from lora_ext.train import batches, dataset
from lora_ext.train.config import ConfigError, TrainConfig
from lora_ext.train.loop import train
from test_train import _assert_same, _cli, _model_state, loss_falls


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sample_data.make_sample_dataset(str(tmp_path_factory.mktemp("data")), size=64, per_concept=3)


def _cfg(data, out, **kw):
    base = dict(train_data_dir=data["train"], caption_extension=".txt", output_dir=str(out), output_name="x",
                resolution="64", train_batch_size=2, max_train_steps=4, network_dim=4, network_alpha=2,
                learning_rate=1e-3, mixed_precision="no", seed=3)
    return TrainConfig(**{**base, **kw})


# --- conditioning against independent implementations ------------------------------------------------------

def test_size_numbers_embed_as_diffusers_and_ldm_embed_timesteps():
    from diffusers.models.embeddings import Timesteps
    from ldm.modules.diffusionmodules.util import timestep_embedding

    numbers = torch.tensor([1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0, 37.5])
    for dim in (16, 256):
        ours = sinusoidal(numbers, dim)
        torch.testing.assert_close(ours, Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)(numbers))
        torch.testing.assert_close(ours, timestep_embedding(numbers, dim))
    cond = Cond(torch.zeros(1, 77, 8), torch.arange(4.0)[None], torch.tensor([[1024.0, 768, 0, 32, 1024, 1024]]))
    vector = cond.vector(16)
    assert vector.shape == (1, 4 + 6 * 16)
    torch.testing.assert_close(vector[0, 4 + 16:4 + 32], sinusoidal(torch.tensor([768.0]), 16)[0])   # original width


def test_pooled_output_is_open_clips_own_text_embedding():
    model = tiny_model("sdxl")
    host = WebuiHost(model)
    clip = host.text_holders()[1].model
    from lora_ext.hosts.text_encoding import chunked_ids

    with torch.no_grad():
        text = host.encode_text(["a red cat on a mat", "blue"])
        ids = chunked_ids(host.text_holders()[1], ["a red cat on a mat", "blue"], 75)
        want = clip.encode_text(ids)            # open_clip: all blocks, ln_final, end token, text_projection
    assert text.tokens.shape == (2, 77, 32 + 64) and text.pooled.shape == (2, 64)
    torch.testing.assert_close(text.pooled, want)


def test_long_prompts_pool_their_first_chunk():
    host = WebuiHost(tiny_model("sdxl"))
    words = "a photo of a red cat, " * 15
    with torch.no_grad():
        long = host.encode_text([words], max_tokens=150)
        first = host.encode_text([" ".join(words.split()[:60])], max_tokens=75)
    assert long.tokens.shape == (1, 154, 96)
    from lora_ext.hosts.text_encoding import chunked_ids, tokenize
    assert len(tokenize(host.text_holders()[1], [words])[0]) > 75
    rows = chunked_ids(host.text_holders()[1], [words], 150)
    with torch.no_grad():
        torch.testing.assert_close(long.pooled, host.text_holders()[1].model.encode_text(rows[:1]))
    assert not torch.allclose(long.pooled, first.pooled)


def test_the_size_conditioning_reaches_the_unet():
    host = WebuiHost(tiny_model("sdxl"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    with torch.no_grad():
        text = host.encode_text(["a cat"])
        a = host.predict(x, t, host.condition(text, [Size.plain(64, 64)]))
        b = host.predict(x, t, host.condition(text, [Size((128, 96), (16, 0), (64, 64))]))
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="one Size per prompt"):
        host.condition(text, None)


def _diffusers_sdxl_folder(folder, model):
    """The tiny SDXL as a diffusers folder: the UNet and both encoders converted with diffusers' own single-file
    functions (the size embedding width set to the tiny one: diffusers assumes SDXL's 256)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_open_clip_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lora_ext.hosts import ldm_layout

    ckpt = model.checkpoint_state_dict()
    config = create_unet_diffusers_config_from_ldm(tiny.ldm_config(model.spec), ckpt)
    config.update(addition_embed_type="text_time", addition_time_embed_dim=model.spec.size_dim, class_embed_type=None)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config))
    unet.save_pretrained(os.path.join(folder, "unet"))
    model.conditioner.embedders[0].wrapped.transformer.save_pretrained(os.path.join(folder, "text_encoder"))
    _, width, layers = model.spec.te[1]
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=width * 4,
                                                     num_hidden_layers=layers, num_attention_heads=2,
                                                     max_position_embeddings=77, projection_dim=width, hidden_act="gelu"))
    te2.load_state_dict(convert_open_clip_checkpoint(te2, ckpt, prefix="conditioner.embedders.1.model."), strict=False)
    te2.save_pretrained(os.path.join(folder, "text_encoder_2"))
    tok = copy.deepcopy(ldm_layout.clip_tokenizer())
    tok.model_max_length = 77           # what the real SDXL tokenizers say (the pipeline pads to it)
    tok.save_pretrained(os.path.join(folder, "tokenizer"))
    tok2 = copy.deepcopy(tok)
    tok2.pad_token = "!"
    tok2.save_pretrained(os.path.join(folder, "tokenizer_2"))
    AutoencoderKL(block_out_channels=[32, 32, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1,
                  norm_num_groups=32, scaling_factor=0.13025).save_pretrained(os.path.join(folder, "vae"))
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        os.path.join(folder, "scheduler"))
    return folder


@pytest.fixture(scope="module")
def diffusers_sdxl(tmp_path_factory):
    from lora_ext.hosts.diffusers_host import DiffusersHost

    return DiffusersHost(_diffusers_sdxl_folder(str(tmp_path_factory.mktemp("dsdxl")), tiny_model("sdxl")))


def test_a_diffusers_sdxl_folder_conditions_and_predicts_as_the_webui_layout_does(diffusers_sdxl):
    """Two implementations of the whole SDXL conditioning: ldm's UNet fed sgm's vector (label_emb) on the webui
    layout, diffusers' UNet embedding time_ids itself from text_embeds and the six numbers."""
    webui = WebuiHost(tiny_model("sdxl"))
    prompts = ["a red cat, sitting", "blue square"]
    sizes = [Size((96, 80), (8, 0), (64, 64)), Size.plain(64, 64)]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        a, b = webui.encode_text(prompts, max_tokens=150), diffusers_sdxl.encode_text(prompts, max_tokens=150)
        torch.testing.assert_close(b.tokens, a.tokens, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.pooled, a.pooled, rtol=1e-4, atol=1e-5)
        pa = webui.predict(x, t, webui.condition(a, sizes))
        pb = diffusers_sdxl.predict(x, t, diffusers_sdxl.condition(b, sizes))
    torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5)
    assert diffusers_sdxl.arch.name == "sdxl" and set(diffusers_sdxl.lora_targets()) == set(webui.lora_targets())


def test_text_encoding_matches_diffusers_sdxl_pipeline(diffusers_sdxl):
    from diffusers import StableDiffusionXLPipeline

    m = diffusers_sdxl.model
    pipe = StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2,
                                     tokenizer=diffusers_sdxl.tokenizer, tokenizer_2=diffusers_sdxl.tokenizer_2,
                                     unet=m.unet, scheduler=__import__("diffusers").DDPMScheduler())
    prompts = ["a red cat, sitting", "blue square"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        ours = diffusers_sdxl.encode_text(prompts)
    torch.testing.assert_close(ours.tokens, embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-4, atol=1e-5)


def test_size_of_a_sample_is_what_kohya_records(tmp_path):
    from PIL import Image

    path = str(tmp_path / "wide.png")
    Image.new("RGB", (120, 60), (200, 10, 10)).save(path)
    item = dataset.Item(path, "c", True, (120, 60), "c", 1, False)
    sample = batches.Sample(item, (64, 64), seed=5)
    size = batches.size_of(sample, batches.Augment(), flip=False)
    # resized to cover 64x64: 128x64; the centered crop starts 32 px in
    assert size == Size((60, 120), (0, 32), (64, 64))
    mirrored = batches.size_of(sample, batches.Augment(), flip=True)
    assert mirrored.crop_top_left == (0, 128 - 96)
    crops = {batches.size_of(batches.Sample(item, (64, 64), seed=s), batches.Augment(random_crop=True), False).crop_top_left
             for s in range(20)}
    assert len(crops) > 3 and all(0 <= left <= 64 and top == 0 for top, left in crops)


# --- training -----------------------------------------------------------------------------------------------

def test_sdxl_training_leaves_the_model_as_it_was_and_writes_kohyas_sdxl_file(data, tmp_path):
    model = tiny_model("sdxl")
    before = _model_state(model)
    result = train(WebuiHost(model), _cfg(data, tmp_path, network_args=["conv_dim=2"], gradient_checkpointing=True,
                                          cache_latents=True, text_encoder_lr=[1e-3, 5e-4],
                                          sample_prompts=["a red cat"], sample_every_n_steps=4, sample_steps=2))
    _assert_same(model, before)
    lora = files.read(result.lora_path)
    names = set(lora.modules)
    assert lora.arch.name == "sdxl" and lora.network == "locon" and result.steps == 4
    assert any(n.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for n in names)
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    meta = lora.metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["ss_text_encoder_lr"] == "[0.001, 0.0005]"
    assert len(os.listdir(tmp_path / "samples")) == 1


def test_sdxl_text_encoders_get_their_own_learning_rates(data, tmp_path):
    from lora_ext.train import loop

    run = loop.prepare(WebuiHost(tiny_model("sdxl")), _cfg(data, tmp_path, text_encoder_lr=[2e-4, 0], unet_lr=1e-3),
                       lambda e: None, lambda: False)
    from lora_ext.train.network import network_for
    run.network = network_for(run.host, run.spec)
    assert run.network.parameters_of("te1") and not run.network.parameters_of("te2")
    groups = loop._optimizer(run).param_groups
    assert sorted(g["lr"] for g in groups) == [2e-4, 1e-3]


def test_sdxl_training_lowers_the_loss_on_fixed_noise(data, tmp_path):
    host = WebuiHost(copy.deepcopy(tiny_model("sdxl")))

    def lora_of():
        # LoCon: SDXL has no attention at full resolution, and a random tiny UNet does not predict noise at
        # all; attention LoRAs at 1/2 and 1/4 resolution alone barely move its loss, res-block convs do
        return train(host, _cfg(data, tmp_path, max_train_steps=60, learning_rate=5e-3, network_dim=8, network_alpha=8,
                                network_args=["conv_dim=8", "conv_alpha=8"], cache_latents=True,
                                network_train_unet_only=True, cache_text_encoder_outputs=True)).lora_path
    before, after = loss_falls(host, data["train"], lora_of)
    assert after < 0.8 * before, (before, after)


def test_sdxl_cancel_and_resume_equal_the_straight_run(data, tmp_path):
    model = tiny_model("sdxl")
    before = _model_state(model)
    cfg = dict(max_train_steps=6, lr_scheduler="cosine", network_dropout=0.1, flip_aug=True, enable_bucket=True,
               min_bucket_reso=64, max_bucket_reso=128)
    straight = train(WebuiHost(model), _cfg(data, tmp_path / "a", **cfg))
    seen = {"n": 0}
    cancelled = train(WebuiHost(model), _cfg(data, tmp_path / "b", **cfg),
                      on_event=lambda e: seen.__setitem__("n", e.step) if e.kind == "step" else None,
                      should_stop=lambda: seen["n"] >= 2)
    assert cancelled.cancelled and cancelled.steps == 2
    resumed = train(WebuiHost(model), _cfg(data, tmp_path / "b", resume=cancelled.state_path, **cfg))
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    a, b = files.read(straight.lora_path).modules, files.read(resumed.lora_path).modules
    for name in a:
        for part in a[name].parts:
            torch.testing.assert_close(b[name].parts[part], a[name].parts[part], rtol=0, atol=1e-6)
    _assert_same(model, before)


def test_sdxl_unet_gradient_matches_a_plain_merged_implementation():
    """Through the hooks on the SDXL UNet (fed the label_emb vector) the LoRA gradient equals autograd's for
    the same loss written with merged weights W + up @ down * scale."""
    from torch import nn
    from torch.func import functional_call

    from lora_ext.train.network import TrainableNetwork

    model = copy.deepcopy(tiny_model("sdxl")).requires_grad_(False)
    host = WebuiHost(model)
    net = TrainableNetwork(host.lora_targets(), 4, 2.0, conv_dim=2, conv_alpha=1.0, trained=lambda t: t.is_unet)
    torch.manual_seed(0)
    for lora in net.loras.values():
        nn.init.normal_(lora.lora_up.weight, std=0.05)
    g = torch.Generator().manual_seed(1)
    x, target, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    with torch.no_grad():
        cond = host.encode_prompts(["red circle", "blue square"], sizes=[Size.plain(64, 64), Size((80, 64), (4, 0), (64, 64))])
    net.attach()
    try:
        torch.nn.functional.mse_loss(host.predict(x, t, cond), target).backward()
    finally:
        net.detach()
    ups = {n: l.lora_up.weight.detach().clone().requires_grad_() for n, l in net.loras.items()}
    downs = {n: l.lora_down.weight.detach().clone().requires_grad_() for n, l in net.loras.items()}
    merged = {}
    for n, lora in net.loras.items():
        path = net.bound[n].target.webui.removeprefix("model.diffusion_model.")
        w = host.unet.get_submodule(path).weight
        up, down = ups[n].reshape(ups[n].shape[0], -1), downs[n].reshape(downs[n].shape[0], -1)
        merged[path + ".weight"] = w + (up @ down).reshape(w.shape) * lora.scale
    y = cond.vector(host.size_dim)
    pred = functional_call(host.unet, merged, args=(x, t), kwargs={"context": cond.crossattn, "y": y}, strict=False)
    torch.nn.functional.mse_loss(pred, target).backward()
    assert len(net.loras) > 300
    for n, lora in net.loras.items():
        torch.testing.assert_close(lora.lora_up.weight.grad, ups[n].grad, rtol=1e-4, atol=1e-7, msg=n)
        torch.testing.assert_close(lora.lora_down.weight.grad, downs[n].grad, rtol=1e-4, atol=1e-7, msg=n)


def test_cached_text_encoder_outputs_give_the_same_run_and_a_disk_cache_is_reused(data, tmp_path):
    host = WebuiHost(tiny_model("sdxl"))
    common = dict(network_train_unet_only=True, max_train_steps=3)
    plain = train(host, _cfg(data, tmp_path / "a", **common))
    cached = train(host, _cfg(data, tmp_path / "b", cache_text_encoder_outputs_to_disk=True, **common))
    # one caption encoded at a time (the cache) or a batch of them: the same up to matmul round-off
    assert cached.losses == pytest.approx(plain.losses, abs=1e-5)
    entries = os.listdir(tmp_path / "b" / "text-cache")
    assert entries and all(e.endswith(".lora_ext-text") for e in entries)
    stamps = {e: os.stat(tmp_path / "b" / "text-cache" / e).st_mtime_ns for e in entries}
    again = train(host, _cfg(data, tmp_path / "b", cache_text_encoder_outputs_to_disk=True, overwrite=True, **common))
    assert again.losses == cached.losses
    assert {e: os.stat(tmp_path / "b" / "text-cache" / e).st_mtime_ns for e in entries} == stamps   # read, not rewritten


@pytest.mark.parametrize("options, message", [
    (dict(cache_text_encoder_outputs=True), "network_train_unet_only"),
    (dict(cache_text_encoder_outputs=True, network_train_unet_only=True, shuffle_caption=True), "shuffle_caption"),
    (dict(min_timestep=500, max_timestep=400), "must be below max_timestep"),
    (dict(max_timestep=1001), "max_timestep = 1001 is out of range"),
    (dict(text_encoder_lr=[1e-4, 1e-4, 1e-4]), "one value, or two"),
    (dict(text_encoder_lr=[1e-4, float("nan")]), "not a finite number"),
])
def test_sdxl_options_are_checked(data, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(data, tmp_path, **options).validate()


def test_timestep_range_zero_terminal_snr_and_v_parameterization(data, tmp_path):
    from lora_ext.train import loop, step
    from lora_ext.train.schedules import zero_terminal_snr

    ac = WebuiHost(tiny_model("sdxl")).alphas_cumprod
    z = zero_terminal_snr(ac)
    assert float(z[-1]) == 0.0 and torch.isclose(z[0], ac[0]) and (z[1:] <= z[:-1]).all()
    run = loop.prepare(WebuiHost(tiny_model("sdxl")), _cfg(data, tmp_path, min_timestep=200, max_timestep=300,
                                                           zero_terminal_snr=True, v_parameterization=True),
                       lambda e: None, lambda: False)
    assert run.prediction == "v" and float(run.ac[-1]) == 0.0
    fake = [types.SimpleNamespace(seed=s) for s in range(200)]
    _, _, t = step.noise_and_timesteps(run, fake, torch.zeros(len(fake), 4, 8, 8))
    assert int(t.min()) >= 200 and int(t.max()) < 300 and len(set(t.tolist())) > 50
    result = train(WebuiHost(tiny_model("sdxl")), _cfg(data, tmp_path, min_timestep=200, max_timestep=300,
                                                        zero_terminal_snr=True, v_parameterization=True, min_snr_gamma=5))
    meta = files.read(result.lora_path).metadata
    assert all(map(lambda v: v == v, result.losses))        # no NaN at the zero-SNR end
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.timestep_range"] == "200,300"
    assert meta["ss_zero_terminal_snr"] == "True"


def test_cli_trains_a_diffusers_sdxl_folder_and_the_webui_model_takes_the_file(data, tmp_path):
    from lora_ext.apply import Engine, Request

    folder = _diffusers_sdxl_folder(str(tmp_path / "d"), tiny_model("sdxl"))
    out = _cli("train", "--pretrained_model_name_or_path", folder, "--train_data_dir", data["train"],
               "--caption_extension", ".txt", "--resolution", "64", "--max_train_steps", "2", "--network_dim", "4",
               "--text_encoder_lr", "1e-4", "2e-4", "--network_args", "conv_dim=2", "--output_dir", "o", "--output_name", "d",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "estimated memory: about **" in out.stderr
    lora = files.read(str(tmp_path / "o" / "d.safetensors"))
    webui = WebuiHost(tiny_model("sdxl"))
    assert lora.arch.name == "sdxl" and set(lora.modules) == set(webui.lora_targets())
    model = tiny_model("sdxl")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine()
    report = engine.apply(webui, [Request(str(tmp_path / "o" / "d.safetensors"))])
    assert report.warnings == [] and report.applied[0]["modules"] == len(webui.lora_targets())
    engine.restore(webui)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_a_single_file_sdxl_checkpoint_without_yaml_gets_sdxls_standard_shapes():
    """The standard config (used when no .yaml is beside the file) builds SDXL's UNet: built on the meta
    device (no memory), its layout read back from its keys is naming's SDXL, label_emb takes 2816."""
    from lora_ext import naming
    from lora_ext.hosts import checkpoint, ldm_layout

    with torch.device("meta"):
        unet = ldm_layout.unet_from_config(checkpoint.STANDARD_UNET["sdxl"])
    assert unet.label_emb[0][0].in_features == 2816
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684     # SDXL base's UNet
    shapes = {f"model.diffusion_model.{k}": tuple(v.shape) for k, v in unet.state_dict().items()}
    for i, te in enumerate(naming.SDXL.text_encoders):            # the text encoders' keys, for the reader
        shapes[f"conditioner.embedders.{i}." + ("transformer.text_model.encoder.layers.0.mlp.fc1.weight" if te.kind == "hf"
                                                   else "model.transformer.resblocks.0.mlp.c_fc.weight")] = (1, 1)
    arch = naming.arch_from_state_dict(shapes)
    assert (arch.channel_mult, arch.depths, arch.mid_depth, arch.linear_proj) == \
        (naming.SDXL.channel_mult, naming.SDXL.depths, naming.SDXL.mid_depth, naming.SDXL.linear_proj)


def test_memory_estimate_covers_sdxl(data, tmp_path):
    from lora_ext.train import memory

    est = memory.estimate(WebuiHost(tiny_model("sdxl")), _cfg(data, tmp_path, network_train_unet_only=True))
    assert est["parts"]["activations"] > 0 and est["lora_parameters"] > 0


def test_resolution_is_compared_with_the_models_own(tmp_path):
    items = [dataset.Item(str(tmp_path / f"{i}.png"), "c", True, size, "c", 1, False)
             for i, size in enumerate([(1200, 900), (700, 600), (1024, 1024)])]
    bucketed = dataset.Scan(items, layouts=[dataset.Layout((1024, 1024), enable_bucket=True, max_bucket_reso=2048)])
    warnings = dataset.resolution_warnings(bucketed, dataset.NATIVE_RESOLUTION["sdxl"], "sdxl")
    assert len(warnings) == 1 and warnings[0].startswith("1 of 3 images are smaller than their bucket") and "1.png" in warnings[0]
    at_512 = dataset.Scan(items, layouts=[dataset.Layout((512, 512))])
    low = dataset.resolution_warnings(at_512, 1024, "sdxl")
    assert "SDXL models were trained at 1024 px" in low[0] and len(low) == 1
    assert dataset.resolution_warnings(at_512, None, "sdxl") == []      # a tiny model: no comparison


def test_a_failing_estimate_leaves_the_model_as_it_was(data, tmp_path):
    """The estimate swaps meta tensors in while it measures; a failure inside (the webui's sgm attention
    once refused our shapes patch) must not leave any behind: every parameter is the same object after."""
    from lora_ext.train import memory

    host = WebuiHost(tiny_model("sdxl"))
    before = {n: p for n, p in host.model.named_parameters()}

    def broken(*a, **k):
        raise TypeError("injected")
    host.predict = broken
    assert memory.summary(host, _cfg(data, tmp_path)).startswith("not available (TypeError: injected")
    after = dict(host.model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is p and p.device.type == "cpu" for n, p in before.items())


def test_clip_skip_is_sdxls_penultimate_layer_whatever_it_says(data, tmp_path):
    from lora_ext.train import loop

    host = WebuiHost(tiny_model("sdxl"))
    with torch.no_grad():
        a, b = host.encode_text(["a red cat"], clip_skip=1), host.encode_text(["a red cat"], clip_skip=2)
        te = host.text_holders()[0].transformer
        from lora_ext.hosts.text_encoding import chunked_ids
        want = te(chunked_ids(host.text_holders()[0], ["a red cat"], 75), output_hidden_states=True).hidden_states[-2]
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.tokens[..., :32], want)
    run = loop.prepare(host, _cfg(data, tmp_path, clip_skip=2), lambda e: None, lambda: False)
    assert any("clip_skip 2 has no effect on SDXL" in m for m in run.messages)


def test_a_headless_run_frees_its_cached_text_encoders_before_the_first_step_and_trains_the_same(data, tmp_path):
    from lora_ext.train import memory

    common = dict(network_train_unet_only=True, cache_text_encoder_outputs=True, max_train_steps=3)
    kept_host = WebuiHost(copy.deepcopy(tiny_model("sdxl")))
    before = _model_state(kept_host.model)
    said = []
    kept = train(kept_host, _cfg(data, tmp_path / "a", **common), on_event=said.append)
    _assert_same(kept_host.model, before)        # the webui's model: its encoders stay, given back as they were
    assert not any(e.kind == "message" and "text encoders are" in e.text for e in said)

    host = WebuiHost(copy.deepcopy(tiny_model("sdxl")))
    host.disposable = True                      # as the CLI's own model
    te_bytes = sum(p.numel() * p.element_size() for m in host.text_encoders() for p in m.parameters())
    est_kept = memory.estimate(kept_host, _cfg(data, tmp_path / "c", **common))
    est = memory.estimate(host, _cfg(data, tmp_path / "c", **common))
    # the headless run frees its VAE decoder at once too (tests/test_train.py)
    assert est_kept["parts"]["weights"] - est["parts"]["weights"] == te_bytes + est["decoder_freed"]
    assert te_bytes > 0 and est["decoder_freed"] > 0
    assert est["encoders_until_cached"] == te_bytes and est_kept["encoders_until_cached"] == 0
    assert est["total"] == max(sum(est["parts"].values()), est["parts"]["weights"] + te_bytes)
    assert "until every caption is encoded" in memory.describe(est)
    events = []
    freed = train(host, _cfg(data, tmp_path / "b", **common), on_event=events.append)
    assert all(p.numel() == 0 for m in host.text_encoders() for p in m.parameters())
    assert any(e.kind == "message" and "the text encoders are freed" in e.text for e in events)
    # every caption encoded first, in one order, instead of as the steps meet them: the same run
    assert freed.losses == kept.losses
    from safetensors.torch import load_file
    a, b = load_file(kept.lora_path), load_file(freed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("options", [dict(sample_prompts=["a cat"], sample_every_n_steps=2, sample_steps=2),
                                     dict(cache_text_encoder_outputs=False)])
def test_text_encoders_stay_when_previews_need_them_or_nothing_is_cached(data, tmp_path, options):
    host = WebuiHost(copy.deepcopy(tiny_model("sdxl")))
    host.disposable = True
    before = {k: v.clone() for m in host.text_encoders() for k, v in m.state_dict().items()}
    cfg = _cfg(data, tmp_path, **{**dict(network_train_unet_only=True, cache_text_encoder_outputs=True,
                                         max_train_steps=2), **options})
    said = []
    train(host, cfg, on_event=said.append)
    after = {k: v for m in host.text_encoders() for k, v in m.state_dict().items()}
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(e.kind == "message" and "text encoders are" in e.text for e in said)


def test_a_cancel_while_captions_are_encoded_first_stops_there_and_keeps_the_encoders(data, tmp_path):
    host = WebuiHost(copy.deepcopy(tiny_model("sdxl")))
    host.disposable = True
    asked = []
    result = train(host, _cfg(data, tmp_path, network_train_unet_only=True, cache_text_encoder_outputs=True,
                              save_state=True), should_stop=lambda: asked.append(1) or len(asked) >= 2)
    assert result.cancelled and result.steps == 0
    assert all(p.numel() > 0 for m in host.text_encoders() for p in m.parameters())


@pytest.mark.parametrize("disposable, previews, device, want", [
    (True, False, "cpu", "freed"), (True, False, "cuda", "freed"),        # a headless run's own model
    (True, True, "cpu", None), (True, True, "cuda", "offloaded"),          # previews need the encoders back
    (False, False, "cpu", None), (False, False, "cuda", "offloaded")])     # the webui's model
def test_how_cached_text_encoders_leave(disposable, previews, device, want):
    from lora_ext.train.leaving import encoders_leave

    cfg = TrainConfig(cache_text_encoder_outputs=True, network_train_unet_only=True,
                      **(dict(sample_prompts=["a cat"], sample_every_n_steps=2) if previews else {}))
    host = types.SimpleNamespace(disposable=disposable)
    assert encoders_leave(host, cfg, False, torch.device(device)) == want
    assert encoders_leave(host, cfg, True, torch.device(device)) is None           # trained: they stay


def _headless(path, later: bool):
    from lora_ext import cli
    return cli._host_for(path, unet_later=later)


def test_a_headless_run_reads_its_unet_only_after_freeing_the_text_encoders_and_trains_the_same(data, tmp_path):
    """The CLI's own model of a run whose text-encoder outputs are cached: every caption is encoded while the
    UNet's weights are still unread, the encoders are freed, then the UNet is read; the estimate's early
    moment holds no UNet; the run's losses and LoRA are those of a model read whole first."""
    from safetensors.torch import load_file

    from lora_ext.train import memory

    path = str(tmp_path / "m.safetensors")
    tiny.save_checkpoint(tiny_model("sdxl"), path)
    common = dict(network_train_unet_only=True, cache_text_encoder_outputs=True, max_train_steps=3)
    whole, later = _headless(path, False), _headless(path, True)
    assert whole.pending is None
    unet_bytes = sum(p.numel() * p.element_size() for p in later.unet.parameters())
    te_bytes = sum(p.numel() * p.element_size() for m in later.text_encoders() for p in m.parameters())
    est, est_whole = (memory.estimate(h, _cfg(data, tmp_path / "e", **common)) for h in (later, whole))
    assert est["read_after_encoders"] == later.pending.nbytes == unet_bytes and est_whole["read_after_encoders"] == 0
    assert est["parts"] == est_whole["parts"]
    assert est["total"] == max(sum(est["parts"].values()), est["parts"]["weights"] - unet_bytes + te_bytes)
    assert "the UNet's" in memory.describe(est) and "the UNet's" not in memory.describe(est_whole)

    unread_while_encoding = []
    encode = later.encode_text
    later.encode_text = lambda *a, **k: unread_while_encoding.append(later.pending is not None) or encode(*a, **k)
    events = []
    read_late = train(later, _cfg(data, tmp_path / "a", **common), on_event=events.append)
    read_first = train(whole, _cfg(data, tmp_path / "b", **common))
    assert unread_while_encoding and all(unread_while_encoding) and later.pending is None
    said = [e.text for e in events if e.kind == "message"]
    assert said.index(next(t for t in said if "the text encoders are freed" in t)) < said.index(
        next(t for t in said if "the UNet's weights" in t and "after the text encoders are freed" in t))
    assert read_late.losses == read_first.losses
    a, b = load_file(read_late.lora_path), load_file(read_first.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_that_needs_the_unet_from_the_start_reads_it_first(data, tmp_path):
    """DoRA's modules start from the layer's weight: a model whose UNet is still unread has it read before
    they are made, and the run equals one on a model read whole. (No estimate first: its steps condition
    the UNet with the text encoders freed, which once failed on the pooled width read off their weights.)"""
    path = str(tmp_path / "m.safetensors")
    tiny.save_checkpoint(tiny_model("sdxl"), path)
    cfg = dict(network_train_unet_only=True, cache_text_encoder_outputs=True, max_train_steps=2,
               network_module="lycoris.kohya", network_args=["algo=locon", "dora_wd=True"])
    later = _headless(path, True)
    read_late = train(later, _cfg(data, tmp_path / "a", **cfg))
    assert later.pending is None
    assert read_late.losses == train(_headless(path, False), _cfg(data, tmp_path / "b", **cfg)).losses


@pytest.mark.parametrize("options, device, want", [
    (dict(), "cpu", True),
    (dict(), "cuda", False),                                     # a GPU's memory is taken when allocated
    (dict(sample_prompts=["a cat"], sample_every_n_steps=2), "cpu", False),     # previews keep the encoders
    (dict(network_module="lycoris.kohya", network_args=["algo=locon", "dora_wd=True"]), "cpu", False),
    (dict(cache_text_encoder_outputs=False), "cpu", False),
    (dict(cache_text_encoder_outputs=False, cache_text_encoder_outputs_to_disk=True), "cpu", True),
    (dict(network_train_unet_only=False), "cpu", False)])       # the encoders trained (the config refuses it)
def test_when_a_headless_run_reads_its_unet_after_the_text_encoders(options, device, want):
    from lora_ext.train.leaving import unet_after_encoders
    from lora_ext.train.network_args import spec

    cfg = TrainConfig(**{**dict(cache_text_encoder_outputs=True, network_train_unet_only=True), **options})
    assert unet_after_encoders(cfg, torch.device(device), spec(cfg)) is want


def test_a_cancel_before_the_encoders_are_freed_does_not_say_they_were(data, tmp_path):
    """A headless run cancelled while its captions are encoded keeps its encoders: its UNet is still read
    (nothing is left half-loaded), but no message claims the two never shared the memory."""
    path = str(tmp_path / "m.safetensors")
    tiny.save_checkpoint(tiny_model("sdxl"), path)
    host = _headless(path, True)
    asked, events = [], []
    result = train(host, _cfg(data, tmp_path / "a", network_train_unet_only=True, cache_text_encoder_outputs=True),
                   on_event=events.append, should_stop=lambda: asked.append(1) or len(asked) >= 2)
    assert result.cancelled and result.steps == 0 and host.pending is None
    assert all(p.numel() > 0 for m in host.text_encoders() for p in m.parameters())
    assert not any(e.kind == "message" and "the UNet's weights" in e.text for e in events)
