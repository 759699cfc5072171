"""naming.py against an independent oracle: diffusers' single-file conversion of the tiny checkpoints, and
kohya's targeting rule applied to a real diffusers UNet / transformers text model of the same config."""
import pytest
import torch
from torch import nn

from lora_ext import naming
from lora_ext.hosts import ldm_layout
from lora_ext import tiny
from conftest import tiny_model


def _diffusers_unet_conversion(model):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    ckpt = model.checkpoint_state_dict()
    config = create_unet_diffusers_config_from_ldm(tiny.ldm_config(model.spec), ckpt)
    return ckpt, config, convert_ldm_unet_checkpoint(ckpt, config)


def _diffusers_te_conversion(model, ckpt, index):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    kind = model.spec.te[index][0]
    holder = f"conditioner.embedders.{index}." if model.spec.arch == "sdxl" else "cond_stage_model."
    if kind == "hf":
        return convert_ldm_clip_checkpoint(ckpt, remove_prefix=holder + "transformer.")
    return convert_open_clip_checkpoint(None, ckpt, prefix=holder + "model.")


def _module(root, path):
    return root.get_submodule(path)


EXPECTED = {
    "sd1": dict(depths=(1, 1, 1, 0), mid_depth=1, linear_proj=False, tes=[("hf", 2)]),
    "sd2": dict(depths=(1, 1, 1, 0), mid_depth=1, linear_proj=True, tes=[("openclip", 3)]),
    "sdxl": dict(depths=(0, 2, 3), mid_depth=3, linear_proj=True, tes=[("hf", 2), ("openclip", 3)]),
}


def test_arch_read_off_model(any_arch):
    arch = naming.arch_from_model(tiny_model(any_arch))
    exp = EXPECTED[any_arch]
    assert arch.name == any_arch
    assert arch.depths == exp["depths"] and arch.mid_depth == exp["mid_depth"]
    assert arch.linear_proj == exp["linear_proj"] and arch.num_res_blocks == 2
    assert [(t.kind, t.layers) for t in arch.text_encoders] == exp["tes"]


def test_webui_paths_resolve_to_layers_of_the_right_kind(any_arch):
    model = tiny_model(any_arch)
    ts = naming.targets(naming.arch_from_model(model))
    assert len({t.kohya for t in ts}) == len(ts)
    for t in ts:
        m = _module(model, t.webui)
        if t.qkv is not None:
            assert isinstance(m, nn.MultiheadAttention)
        elif t.kind == naming.LINEAR:
            assert isinstance(m, nn.Linear), t
        else:
            assert isinstance(m, nn.Conv2d), t
            assert (m.kernel_size == (1, 1)) == (t.kind == naming.CONV1X1), t


def test_unet_names_match_diffusers_conversion(any_arch):
    model = tiny_model(any_arch)
    ckpt, _, converted = _diffusers_unet_conversion(model)
    unet_targets = [t for t in naming.targets(naming.arch_from_model(model)) if t.is_unet]
    assert len(unet_targets) > 50
    for t in unet_targets:
        ours = ckpt[t.checkpoint_key]
        theirs = converted[t.diffusers.removeprefix("unet.") + ".weight"]
        if ours.shape != theirs.shape:   # SD1 proj_in: diffusers may hold a 1x1 conv as linear or vice versa
            theirs = theirs.reshape(ours.shape)
        assert torch.equal(ours, theirs), t


def test_text_encoder_names_match_diffusers_conversion(any_arch):
    model = tiny_model(any_arch)
    ckpt = model.checkpoint_state_dict()
    arch = naming.arch_from_model(model)
    te_targets = [t for t in naming.targets(arch) if not t.is_unet]
    for index in range(len(arch.text_encoders)):
        converted = _diffusers_te_conversion(model, ckpt, index)
        root = "text_encoder." if index == 0 else f"text_encoder_{index + 1}."
        mine = [t for t in te_targets if t.diffusers.startswith(root)]
        assert len(mine) == 6 * arch.text_encoders[index].layers
        for t in mine:
            ours = ckpt[t.checkpoint_key]
            if t.qkv is not None:
                ours = ours.chunk(3, 0)[t.qkv]
            assert torch.equal(ours, converted[t.diffusers.removeprefix(root) + ".weight"]), t


def test_target_set_is_kohyas_rule_on_a_real_diffusers_unet(any_arch):
    """kohya targets Linear/Conv2d children of Transformer2DModel, and with LoCon of ResnetBlock2D,
    Downsample2D, Upsample2D. Apply that rule to diffusers' own UNet of the same config."""
    from diffusers import UNet2DConditionModel

    model = tiny_model(any_arch)
    _, config, _ = _diffusers_unet_conversion(model)
    unet = UNet2DConditionModel(**config)
    expected = {}
    for name, module in unet.named_modules():
        cls = type(module).__name__
        if cls in ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
            for child, m in module.named_modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    expected[f"unet.{name}.{child}"] = cls != "Transformer2DModel"
    ours = {t.diffusers: t.locon for t in naming.targets(naming.arch_from_model(model)) if t.is_unet}
    assert ours == expected


def test_text_encoder_target_set_is_kohyas_rule(any_arch):
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_ext.hosts.ldm_layout import v4_layout

    arch = naming.arch_from_model(tiny_model(any_arch))
    for index, te in enumerate(arch.text_encoders):
        # kohya's names are those of transformers 4's layout (`text_model.` ...), which v4_layout keeps under 5
        hf = v4_layout(CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=te.layers,
                                                    num_attention_heads=2)))
        expected = set()
        for name, module in hf.named_modules():
            if type(module).__name__ in ("CLIPAttention", "CLIPMLP"):
                expected |= {f"{name}.{c}" for c, m in module.named_modules() if isinstance(m, nn.Linear)}
        prefix = "lora_te" if len(arch.text_encoders) == 1 else f"lora_te{index + 1}"
        ours = {t.kohya for t in naming.targets(arch) if t.kohya.startswith(prefix + "_")}
        assert ours == {prefix + "_" + e.replace(".", "_") for e in expected}


@pytest.mark.parametrize("arch", [naming.SD1, naming.SD2, naming.SDXL])
def test_full_size_counts_match_kohya(arch):
    # kohya creates 192 UNet + 72 TE modules for SD1 (264, the count the built-in reports for SD1 LoRAs),
    # SDXL: 722 UNet + 264 TE modules without conv layers
    ts = naming.targets(arch)
    unet = [t for t in ts if t.is_unet and not t.locon]
    te = [t for t in ts if not t.is_unet]
    expected = {"sd1": (192, 72), "sd2": (192, 144), "sdxl": (722, 264)}[arch.name]
    assert (len(unet), len(te)) == expected


def test_both_unet_styles_and_diffusers_paths_find_the_same_target():
    index = naming.NameIndex(naming.SD1)
    t = index.find("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k")
    assert t.webui == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    assert index.find("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k") is t
    assert index.find("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") is t
    up = index.find("lora_unet_up_blocks_0_upsamplers_0_conv")
    assert up.webui == "model.diffusion_model.output_blocks.2.1.conv"
    assert index.find("lora_unet_up_blocks_1_upsamplers_0_conv").webui.endswith("output_blocks.5.2.conv")
    xl = naming.NameIndex(naming.SDXL)
    t = xl.find("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q")
    assert t.kohya == "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"
    assert t.alias == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"
    assert xl.find("lora_te2_text_model_encoder_layers_31_self_attn_v_proj").qkv == 2


def test_tiny_checkpoint_on_disk_rebuilds_from_its_yaml(tmp_path, any_arch):
    """A tiny model written as a webui checkpoint + same-named ldm .yaml: the yaml's UNet config builds a
    UNet that takes the checkpoint's weights strictly, and the keys follow the webui's layout."""
    import yaml
    from safetensors.torch import load_file

    model = tiny_model(any_arch)
    path = str(tmp_path / f"tiny-{any_arch}.safetensors")
    yaml_path = tiny.save_checkpoint(model, path)
    assert yaml_path == str(tmp_path / f"tiny-{any_arch}.yaml")
    sd = load_file(path)
    cfg = yaml.safe_load(open(yaml_path))["model"]["params"]
    unet = ldm_layout.unet_from_config(cfg.get("unet_config", cfg.get("network_config"))["params"])
    prefix = "model.diffusion_model."
    unet.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    te_prefix = {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model.transformer.",
                 "sdxl": "conditioner.embedders.1.model.transformer."}[any_arch]
    assert any(k.startswith(te_prefix) for k in sd) and any(k.startswith("first_stage_model.encoder.") for k in sd)
    assert not any(".wrapped." in k for k in sd) and "alphas_cumprod" in sd
    assert cfg["parameterization"] == model.parameterization


def test_extra_layers_are_found_in_both_unet_styles_and_never_trained():
    """Norm layers, conv_in / conv_out and the embeddings answer to kohya's diffusers-style and sgm-style names
    (and diffusers paths), with the module path and kind of the layer; targets() (what training takes) holds
    none of them."""
    from lora_ext import naming

    for arch in (naming.SD1, naming.SDXL):
        index = naming.NameIndex(arch)
        extra = naming.extra_targets(arch)
        assert not {t.kohya for t in extra} & {t.kohya for t in naming.targets(arch)}
        assert all(t.extra for t in extra) and not any(t.extra for t in naming.targets(arch))
        for diffusers_style, sgm_style, webui, kind in [
                ("lora_unet_down_blocks_0_resnets_0_norm1", "lora_unet_input_blocks_1_0_in_layers_0",
                 "model.diffusion_model.input_blocks.1.0.in_layers.0", naming.NORM),
                ("lora_unet_conv_in", "lora_unet_input_blocks_0_0", "model.diffusion_model.input_blocks.0.0", naming.CONV),
                ("lora_unet_conv_norm_out", "lora_unet_out_0", "model.diffusion_model.out.0", naming.NORM),
                ("lora_unet_time_embedding_linear_2", "lora_unet_time_embed_2", "model.diffusion_model.time_embed.2",
                 naming.LINEAR)]:
            t = index.find(diffusers_style)
            assert t is index.find(sgm_style) and t.webui == webui and t.kind == kind
        te = "lora_te1" if arch.name == "sdxl" else "lora_te"
        t = index.find(f"{te}_text_model_encoder_layers_0_layer_norm1")
        assert t.kind == naming.NORM and t.webui.endswith("transformer.text_model.encoder.layers.0.layer_norm1")
    xl = naming.NameIndex(naming.SDXL)
    assert xl.find("lora_te2_text_model_final_layer_norm").webui == "conditioner.embedders.1.wrapped.model.ln_final"
    assert xl.find("lora_unet_label_emb_0_0").diffusers == "unet.add_embedding.linear_1"
