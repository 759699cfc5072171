"""Regional masks and step schedules per slot: the mask text, the engine's masked bypass (every hooked UNet
layer adds nothing where the mask is 0; white = unmasked, black = no LoRA; two LoRAs in two regions), the
step range in both modes, and the slot's fields through the API, the infotext and the webui double."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from lora_ext import files, regions
from lora_ext.panel import masks
from lora_ext.panel import slots as slotlib
from lora_ext.apply import Engine, Request
from random_networks import make_random_lora
from lora_ext.hosts.webui import WebuiHost
from lora_ext.networks.stored import StoredModule

LATENT = (16, 24)       # not square: the grids of each level are told apart by their token counts


def _png(array, mode=None, url=False) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    return "data:image/png;base64," + text if url else text


def _left_half(value=1.0, size=(64, 96)) -> masks.Mask:
    pixels = torch.zeros(size)
    pixels[:, : size[1] // 2] = value
    return masks.Mask(pixels)


def _file(path, model, seed=1, keep=lambda name: True) -> str:
    modules = {k: v for k, v in make_random_lora(model, rank=4, alpha=4.0, conv_rank=2, seed=seed).items() if keep(k)}
    files.write_kohya(str(path), files.kohya_tensors(modules), {}, overwrite=True)
    return str(path)


def _unet_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, *LATENT, generator=g)
    ctx = torch.randn(1, 77, sum(w for _, w, _ in model.spec.te), generator=g)
    unet = model.model.diffusion_model
    y = torch.randn(1, unet.label_emb[0][0].in_features, generator=g) if model.is_sdxl else None
    with torch.no_grad():
        return unet(x, torch.tensor([500]), context=ctx, y=y)


def test_a_mask_reads_from_base64_or_a_data_url_and_bad_ones_say_what_to_send():
    white = np.full((8, 12), 255)
    assert masks.decode(_png(white)).pixels.min() == 1
    grey = masks.decode(_png(np.full((8, 12), 51), url=True))
    assert grey.pixels.shape == (8, 12) and torch.allclose(grey.pixels, torch.full((8, 12), 0.2))
    rgba = np.zeros((4, 4, 4))
    rgba[..., :3], rgba[:2, :, 3] = 255, 255            # white, transparent in the lower half
    m = masks.decode(_png(rgba, "RGBA"))
    assert m.pixels[:2].min() == 1 and m.pixels[2:].max() == 0
    for text, said in (("not base64 !!", "not base64"), (base64.b64encode(b"hello").decode(), "not an image"),
                       ("A" * (masks.MAX_TEXT + 4), "MB of text")):
        with pytest.raises(ValueError, match=said):
            masks.decode(text)
    huge = io.BytesIO()
    Image.new("1", (9000, 8000)).save(huge, format="PNG")      # 72 Mpx of a few kB: refused before decoding
    with pytest.raises(ValueError, match="megapixels"):
        masks.decode(base64.b64encode(huge.getvalue()).decode())
    assert masks.decode(masks.encode(Image.fromarray(np.full((3, 5), 255, np.uint8)))).pixels.shape == (3, 5)


def test_a_mask_lies_over_each_grid_of_the_latent():
    m = _left_half()
    maps = m.over(torch.zeros(2, 7, 4, 6), LATENT)
    assert maps.shape == (1, 1, 4, 6) and maps[..., :3].min() == 1 and maps[..., 3:].max() == 0
    tokens = m.over(torch.zeros(2, 8 * 12, 5), LATENT).reshape(8, 12)      # a level down: 8 x 12 tokens
    assert tokens[:, :6].min() == 1 and tokens[:, 6:].max() == 0
    assert m.over(torch.zeros(2, 77, 5), LATENT) is None and m.over(torch.zeros(2, 5), LATENT) is None


def _probe_added_outputs(host, engine, added):
    """Forward hooks after ours on every layer we hooked: what our hook added on top of the layer's own op."""
    from torch.nn import functional as F

    handles, hooked = [], engine._states[host.model].hooked
    for bound in host.applied_targets().values():
        layer = bound.module
        if id(layer) not in hooked or bound.part != "weight":
            continue

        def probe(module, args, output, name=bound.target.kohya, spatial=regions.spatial(bound.target)):
            own = module._conv_forward(args[0], module.weight, module.bias) if isinstance(module, torch.nn.Conv2d) \
                else F.linear(args[0], module.weight, module.bias)
            added.append((name, spatial, output - own))
        handles.append(layer.register_forward_hook(probe))
    return handles


@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_every_hooked_unet_layer_adds_nothing_where_the_mask_is_black(tmp_path, mode):
    model = tiny_model("sd1")
    host = WebuiHost(model)
    path = _file(tmp_path / "l.safetensors", model)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    engine, mask = Engine(), _left_half()
    report = engine.apply(host, [Request(path, mask=mask)], mode)
    added = []
    handles = _probe_added_outputs(host, engine, added)
    try:
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items() if ".diffusion_model." in k)
        _unet_out(model)
        spatial = [(n, a) for n, s, a in added if s]
        assert len(spatial) > 20 and report.applied[0]["modules"] > len(spatial) // 2
        for name, change in spatial:
            where = mask.over(change, LATENT)
            assert where is not None, name
            black = (where == 0).expand_as(change)
            assert black.any() and torch.equal(change[black], torch.zeros_like(change[black])), name
            assert change[~black].abs().max() > 0, name       # and it does paint the white half
    finally:
        for h in handles:
            h.remove()
        engine.restore(host)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert not engine.active(model)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_white_is_the_unmasked_bypass_and_black_is_no_lora(tmp_path, arch):
    model = tiny_model(arch)
    host = WebuiHost(model)
    path = _file(tmp_path / "l.safetensors", model)
    engine = Engine()
    plain = _unet_out(model)
    try:
        engine.apply(host, [Request(path, 0.9)], "bypass")
        unmasked = _unet_out(model)
        engine.apply(host, [Request(path, 0.9, mask=masks.Mask(torch.ones(32, 48)))])
        assert torch.allclose(_unet_out(model), unmasked, atol=1e-6)
        assert (unmasked - plain).abs().max() > 1e-3
        engine.apply(host, [Request(path, 0.9, mask=masks.Mask(torch.zeros(32, 48)))])
        assert torch.equal(_unet_out(model), plain)
        half = _left_half()
        engine.apply(host, [Request(path, 0.9, mask=half)])
        moved = (_unet_out(model) - plain).abs().mean(dim=(0, 1))
        assert moved[:, :12].mean() > 2 * moved[:, 12:].mean()      # the painted half moves most
    finally:
        engine.restore(host)
    assert torch.equal(_unet_out(model), plain)


def test_layers_without_image_positions_are_masked_at_their_attention_or_res_block(tmp_path):
    """Cross-attention key/value (they read the prompt) and res blocks' time-embedding layers: two LoRAs with
    complementary masks give each half what that LoRA alone gives it, unmasked."""
    model = tiny_model("sd1")
    host = WebuiHost(model)
    not_spatial = {b.target.kohya for b in host.lora_targets().values() if b.target.is_unet and not regions.spatial(b.target)}
    assert any("attn2_to_k" in n for n in not_spatial) and any("emb_layers" in n or "time_emb" in n for n in not_spatial)
    a = _file(tmp_path / "a.safetensors", model, 1, lambda n: n in not_spatial)
    b = _file(tmp_path / "b.safetensors", model, 2, lambda n: n in not_spatial)
    engine = Engine()
    left, right = _left_half(), masks.Mask(1 - _left_half().pixels)
    attn = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, LATENT[0] * LATENT[1], attn.to_q.in_features, generator=g)
    ctx = torch.randn(1, 77, attn.to_k.in_features, generator=g)
    outs = {}
    try:
        for key, requests in (("ab", [Request(a, mask=left), Request(b, mask=right)]), ("a", [Request(a)]),
                              ("b", [Request(b)]), ("none", [])):
            engine.apply(host, requests)
            _unet_out(model)        # the UNet's call tells the masks the latent's size
            with torch.no_grad():
                outs[key] = attn(x, context=ctx)
        assert not engine._states[model].blends      # gone with the masks
    finally:
        engine.restore(host)
    on_left = left.over(outs["ab"], LATENT).expand_as(outs["ab"]).bool()
    assert torch.allclose(outs["ab"][on_left], outs["a"][on_left], atol=1e-6)
    assert torch.allclose(outs["ab"][~on_left], outs["b"][~on_left], atol=1e-6)
    assert not torch.allclose(outs["a"], outs["none"], atol=1e-3) and not torch.allclose(outs["a"], outs["b"], atol=1e-3)
    engine.apply(host, [Request(a, mask=masks.Mask(torch.zeros(4, 4)))])
    try:
        _unet_out(model)
        with torch.no_grad():
            assert torch.equal(attn(x, context=ctx), outs["none"])     # black: exactly no LoRA
    finally:
        engine.restore(host)


def test_time_embedding_changes_are_masked_over_the_whole_unet(tmp_path):
    """A full/diff file on the UNet's own time embedding: masked at the UNet, so black is still no LoRA."""
    model = tiny_model("sd1")
    host = WebuiHost(model)
    bound = next(b for n, b in host.applied_targets().items() if b.target.webui.endswith("time_embed.0"))
    module = StoredModule.from_parts({"diff": torch.randn(bound.shape) * 0.2})
    path = str(tmp_path / "t.safetensors")
    files.write_kohya(path, files.kohya_tensors({bound.target.kohya: module}), {})
    engine, plain = Engine(), _unet_out(model)
    try:
        engine.apply(host, [Request(path, mask=masks.Mask(torch.zeros(4, 4)))])
        assert id(model.model.diffusion_model) in engine._states[model].blends
        assert torch.equal(_unet_out(model), plain)
        engine.apply(host, [Request(path)], "bypass")
        unmasked = _unet_out(model)
        engine.apply(host, [Request(path, mask=masks.Mask(torch.ones(4, 4)))])
        assert torch.allclose(_unet_out(model), unmasked, atol=1e-6) and not torch.equal(unmasked, plain)
    finally:
        engine.restore(host)
    assert torch.equal(_unet_out(model), plain) and not engine.active(model)


@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_a_step_range_switches_the_unet_part_and_keeps_the_text_encoder(tmp_path, mode):
    model = tiny_model("sd1")
    host = WebuiHost(model)
    path = _file(tmp_path / "l.safetensors", model)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    engine, plain = Engine(), _unet_out(model)
    req = Request(path, start=0.4, stop=0.8)
    assert [req.active_at(x) for x in (None, 0.0, 0.39, 0.4, 0.79, 0.8, 1.0)] == [False, False, False, True, True, False, False]
    te_changed = lambda: any(not torch.equal(v, snap[k]) for k, v in model.state_dict().items() if k.startswith("cond_stage"))  # noqa: E731
    try:
        engine.apply(host, [req], mode, at=0.0)
        assert torch.equal(_unet_out(model), plain) and (te_changed() or mode == "bypass")
        edits = engine.text_encoder_edits
        report = engine.apply(host, [req], mode, at=0.5)
        on = _unet_out(model)
        assert not torch.equal(on, plain) and engine.text_encoder_edits == edits   # no new conditioning
        assert (report.written > 0) == (mode == "merge")
        engine.apply(host, [Request(path)], mode)
        assert torch.allclose(_unet_out(model), on, atol=1e-6)
        engine.apply(host, [req], mode, at=0.9)
        assert torch.equal(_unet_out(model), plain)
    finally:
        engine.restore(host)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_the_slot_carries_mask_start_and_stop_through_the_api_and_the_infotext():
    slot = slotlib.Slot.from_any({"enabled": True, "model": "l.safetensors", "mask": " abc ", "start": "0.25", "stop": 0.75})
    assert (slot.mask, slot.start, slot.stop) == ("abc", 0.25, 0.75)
    params = slotlib.to_infotext([slot], lambda m: None, lambda s: "64x96 #0011aabb")
    assert params["AddNet Start 1"] == "0.25" and params["AddNet Stop 1"] == "0.75"
    assert params["AddNet Mask 1"] == "64x96 #0011aabb"
    pasted = slotlib.from_infotext(params, 1, lambda n, h: "l.safetensors")[0]
    assert (pasted.start, pasted.stop, pasted.mask) == (0.25, 0.75, "")      # the mask image is not in the text
    assert "AddNet Start 1" not in slotlib.to_infotext([slotlib.Slot(True, "l.safetensors")], lambda m: None)
    for bad, said in (({"start": 0.6, "stop": 0.4}, "must be below its stop"), ({"start": -0.1}, "from 0 to 1"),
                      ({"stop": "nan"}, "finite number"), ({"stop": 2}, "from 0 to 1")):
        with pytest.raises(ValueError, match=said):
            slotlib.Slot.from_any({"enabled": True, "model": "l.safetensors", **bad})
    slots, problems = slotlib.from_args([{"model": "a", "start": 1}, {"enabled": True, "model": "b"}], {1: {"stop": 0.5}})
    assert problems == ["slot 1: slot start 1 must be below its stop 1 (0.4 and 1 = the last 60 % of the steps)"]
    assert not slots[0].active and slots[1].active and slots[1].stop == 0.5


def test_the_panel_runtime_decodes_masks_switches_at_step_boundaries_and_says_what_the_text_encoder_does(tmp_path):
    from lora_ext.library import LoraLibrary
    from lora_ext.panel.runtime import PanelRuntime

    model = tiny_model("sd1")
    host = WebuiHost(model)
    folder = tmp_path / "loras"
    folder.mkdir()
    _file(folder / "l.safetensors", model)
    runtime = PanelRuntime(LoraLibrary(lambda: [str(folder)]))
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    white = _png(np.full((8, 12), 255))
    try:
        out = runtime.run(host, [slotlib.Slot(True, "l.safetensors", start=0.5, mask=white)])
        assert out.infotext["AddNet Mask 1"].startswith("12x8 #") and out.infotext["AddNet Stop 1"] == "1"
        assert any("the text encoder part acts on the whole prompt" in m for m in out.messages)
        switched = [i for i in range(10) if runtime.step(host, i, 10) is not None]
        assert switched == [5]                                 # one switch, at the boundary
        assert runtime.step(host, 0, 10) is not None and runtime.step(host, 3, 10) is None
        out = runtime.run(host, [slotlib.Slot(True, "l.safetensors", mask="bm90IGFuIGltYWdl")])
        assert "slot 1: skipped: the mask is not an image" in out.infotext["AddNet Warning"]
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
        assert runtime.step(host, 5, 10) is None               # no schedule: nothing to do per step
    finally:
        runtime.restore(host)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
