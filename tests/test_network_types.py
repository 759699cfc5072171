"""DoRA files (weight-decomposed LoRA: `dora_scale` beside the LoRA tensors) are applied as the webui's
built-in Lora applies them, never as a plain LoRA; in merge and bypass modes, with exact restore; merged into
checkpoints the same way; refused by name where the change cannot be expressed (resize, merge-LoRAs)."""
import re

import pytest
import torch

from conftest import tiny_model
from lora_ext import files
from lora_ext.apply import BYPASS, MERGE, Engine, Request
from random_networks import make_random_dora
from lora_ext.hosts.webui import WebuiHost
from lora_ext.networks.stored import BadModule, StoredModule


def _reference(w0, up, down, scale, magnitude):
    """DoRA written out per input column: W' = m_j * (W0 + s*U)[:, j] / |(W0 + s*U)[:, j]|."""
    merged = w0 + (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w0.shape) * scale
    flat = merged.reshape(merged.shape[0], merged.shape[1], -1)             # [out, in, k]
    norms = torch.sqrt((flat ** 2).sum(dim=(0, 2)))                            # one per input channel
    return (flat * (magnitude.reshape(-1)[None, :, None] / norms[None, :, None])).reshape(w0.shape) - w0


def dora_file(model, path, seed=3):
    out = make_random_dora(model, seed)
    files.write_kohya(path, files.kohya_tensors(out), {"ss_output_name": "dora"})
    return out


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("mode", [MERGE, BYPASS])
def test_dora_is_applied_as_the_builtin_does_and_restored_exactly(tmp_path, arch, mode):
    model = tiny_model(arch)
    host = WebuiHost(model)
    path = str(tmp_path / "dora.safetensors")
    modules = dora_file(model, path)
    assert files.read(path).network == "locon+dora"
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    linear = next(n for n, m in modules.items() if host.lora_targets()[n].target.is_unet
                  and m.parts["lora_down.weight"].ndim == 2)
    conv = next(n for n, m in modules.items() if m.parts["lora_down.weight"].ndim == 4
                and m.parts["lora_down.weight"].shape[2] == 3)
    engine = Engine(mode=mode)
    engine.apply(host, [Request(path, unet=0.7, te=0.7)])
    try:
        for name in (linear, conv):
            bound = host.lora_targets()[name]
            m = modules[name]
            want = _reference(snap[bound.target.webui + ".weight"].float(), m.parts["lora_up.weight"],
                              m.parts["lora_down.weight"], m.scale, m.parts["dora_scale"]) * 0.7
            layer = model.get_submodule(bound.target.webui)
            if mode == MERGE:
                got = layer.weight.detach() - snap[bound.target.webui + ".weight"]
            else:       # the layer's output change on an input, as a weight: probe with the identity
                assert torch.equal(layer.weight, snap[bound.target.webui + ".weight"])
                got = _probe(layer, want.shape)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            plain = (m.parts["lora_up.weight"].reshape(m.parts["lora_up.weight"].shape[0], -1)
                     @ m.parts["lora_down.weight"].reshape(m.parts["lora_down.weight"].shape[0], -1)).reshape(want.shape)
            assert (got - plain * m.scale * 0.7).abs().max() > 1e-4      # not applied as a plain LoRA
    finally:
        engine.restore(host)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def _probe(layer, shape):
    """The change a bypass hook adds, read back as a weight (the layer is linear in its input)."""
    with torch.no_grad():
        if isinstance(layer, torch.nn.Linear):
            eye = torch.eye(shape[1])
            return (layer(eye) - torch.nn.functional.linear(eye, layer.weight, layer.bias)).T
        k = shape[2]
        x = torch.zeros(shape[1] * k * k, shape[1], k, k)
        for i in range(shape[1]):
            for a in range(k):
                for b in range(k):
                    x[(i * k + a) * k + b, i, a, b] = 1
        pad = layer.padding
        layer.padding = (0, 0)
        try:
            out = layer(x) - torch.nn.functional.conv2d(x, layer.weight, layer.bias)
        finally:
            layer.padding = pad
        return out.reshape(shape[1], k, k, shape[0]).permute(3, 0, 1, 2)


def test_dora_merges_into_a_checkpoint_as_it_applies(tmp_path):
    from lora_ext.merge import Item, merge_checkpoint
    from lora_ext import tiny

    model = tiny_model("sd1")
    ckpt = str(tmp_path / "base.safetensors")
    tiny.save_checkpoint(model, ckpt)
    path = str(tmp_path / "dora.safetensors")
    dora_file(model, path)
    merge_checkpoint(ckpt, [Item(path, 0.5, 0.5)], str(tmp_path / "merged.safetensors"), "fp32")
    from safetensors.torch import load_file
    merged = load_file(str(tmp_path / "merged.safetensors"))
    host = WebuiHost(model)
    engine = Engine()
    engine.apply(host, [Request(path, unet=0.5, te=0.5)])
    try:
        live = model.checkpoint_state_dict()
        for key in ("model.diffusion_model.input_blocks.1.1.proj_in.weight",
                    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"):
            torch.testing.assert_close(merged[key], live[key], rtol=1e-5, atol=1e-6)
    finally:
        engine.restore(host)


def test_dora_is_refused_by_name_where_it_cannot_be_expressed(tmp_path):
    from lora_ext.tools import lowrank

    modules = dora_file(tiny_model("sd1"), str(tmp_path / "dora.safetensors"))
    with pytest.raises(ValueError, match="DoRA module .* cannot be resized"):
        lowrank.resize(modules, rank=2)
    with pytest.raises(ValueError, match="DoRA module .* cannot be merged with other LoRAs"):
        lowrank.merge_loras([(modules, 1.0)])
    m = next(iter(modules.values()))
    with pytest.raises(BadModule, match="depends on the layer's weight"):
        m.delta(tuple(m.parts["lora_up.weight"].shape[:1]) + tuple(m.parts["lora_down.weight"].shape[1:]))
    bad = StoredModule("lora", {**m.parts, "dora_scale": torch.ones(1, 7)}, m.alpha)
    with pytest.raises(BadModule, match="dora_scale \\[1, 7\\] does not fit"):
        bad.delta(m.parts["lora_up.weight"].shape[:1] + m.parts["lora_down.weight"].shape[1:],
                  torch.ones(m.parts["lora_up.weight"].shape[0], m.parts["lora_down.weight"].shape[1]))


@pytest.mark.parametrize("parts, kind", [
    ({"weight": (8, 1)}, "IA3 without on_input"),
    ({"oft_R": (2, 4, 4)}, "PEFT OFT (oft_R)"),
])
def test_types_we_cannot_apply_are_refused_by_name(tmp_path, parts, kind):
    """A file holding a type we do not apply is refused naming it (panel, inspect), never read as another
    type or half applied: here its modules sit beside a plain LoRA module."""
    from safetensors.torch import save_file

    tensors = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{p}": torch.ones(s) if s else torch.tensor(1.0)
               for p, s in parts.items()}
    tensors.update({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(4, 32),
                    "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(32, 4)})
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path)
    with pytest.raises(files.LoraFileError, match=f"it holds {re.escape(kind)} modules .* does not apply yet"):
        files.read(path)
    report = Engine().apply(WebuiHost(tiny_model("sd1")), [Request(path)])
    assert report.applied == [] and kind in report.warnings[0]


def test_one_registry_of_types_each_detected_by_its_own_parts():
    from lora_ext.networks import kinds

    assert [t.name for t in kinds.TYPES] == ["lora", "loha", "lokr", "ia3", "oft", "glora", "full", "norm"]
    for t in kinds.TYPES:
        parts = {p: torch.ones(2, 2) for p in t.parts}
        if t.name == "oft":
            parts.pop("oft_diag")
        assert kinds.detect(parts) is t
        assert set(t.parts) <= kinds.KNOWN_PARTS
    with pytest.raises(BadModule, match="form no LoRA, LoHa, LoKr, IA3, OFT, GLoRA, full \\(diff\\), norm module"):
        kinds.detect({"something": torch.ones(1)})
    plain = StoredModule.from_parts({"lora_down.weight": torch.ones(2, 4), "lora_up.weight": torch.ones(3, 2)})
    assert plain.low_rank() is not None
    assert StoredModule("lora", {**plain.parts, "dora_scale": torch.ones(1, 4)}).low_rank() is None
    assert StoredModule("lora", {**plain.parts, "lora_mid.weight": torch.ones(2, 2, 3, 3)}).low_rank() is None


def test_a_dora_magnitude_that_fits_no_axis_is_refused_before_any_weight_changes(tmp_path):
    """A file that lies about its magnitude's size is told at planning ('does not fit'), and the model keeps
    every bit: nothing is half written."""
    model = tiny_model("sd1")
    modules = make_random_dora(model)
    name = next(n for n, m in modules.items() if m.parts["dora_scale"].numel() > 2)
    m = modules[name]
    modules[name] = StoredModule("lora", {**m.parts, "dora_scale": m.parts["dora_scale"].flatten()[:-1][None]}, m.alpha)
    path = str(tmp_path / "liar.safetensors")
    files.write_kohya(path, files.kohya_tensors(modules), {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = Engine().apply(WebuiHost(model), [Request(path)])
    assert report.applied == [] and "does not fit the loaded model" in report.warnings[0] and name in report.warnings[0]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
