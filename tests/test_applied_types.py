"""Every network type the engine applies, on the tiny SD1, SD2 and SDXL models: merge mode writes W0 + w * delta(W0)
into each layer, bypass mode makes each layer compute what the merged weight computes without touching a
weight, and both give the model back bit-exact."""
import pytest
import torch

from conftest import tiny_model
from lora_ext import files
from lora_ext.apply import BYPASS, MERGE, Engine, Request
from random_networks import make_random_network, network_names
from lora_ext.hosts.webui import WebuiHost

# every registered type and layout (a new type is in without a line here); these cover no conv layer (IA3 and
# the first GLoRA layout as the built-in applies them: Linear only; norm: norm layers only)
NETWORKS = network_names()
LINEAR_ONLY = {"ia3", "glora_v1", "norm"}
WEIGHT = 0.6


LAYER_KINDS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def _layer_input(layer, g):
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(2, layer.in_features, generator=g)
    if isinstance(layer, torch.nn.LayerNorm):
        return torch.randn(2, *layer.normalized_shape, generator=g)
    channels = layer.in_channels if isinstance(layer, torch.nn.Conv2d) else layer.num_channels
    return torch.randn(1, channels, 6, 6, generator=g)


def _sampled(host, modules):
    """A few hookable layers of the file: the first and last of each kind of layer it changes."""
    targets = host.applied_targets()
    plain = [n for n in modules if targets[n].target.qkv is None and targets[n].owner is None]
    groups = {kind: [n for n in plain if type(targets[n].module) is kind] for kind in LAYER_KINDS}
    return {kind: sorted({group[0], group[-1]}) for kind, group in groups.items() if group}


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_each_type_merges_and_bypasses_alike_and_restores_exactly(tmp_path, arch, network):
    model = tiny_model(arch)
    host = WebuiHost(model)
    modules = make_random_network(model, network, conv=network not in LINEAR_ONLY)
    path = str(tmp_path / f"{network}.safetensors")
    files.write_kohya(path, files.kohya_tensors(modules), {"ss_output_name": network})
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    sampled = _sampled(host, modules)
    want_kinds = {"norm": {torch.nn.GroupNorm, torch.nn.LayerNorm}}.get(
        network, {torch.nn.Linear} if network in LINEAR_ONLY else {torch.nn.Linear, torch.nn.Conv2d})
    assert set(sampled) == want_kinds
    names = [n for group in sampled.values() for n in group]
    g = torch.Generator().manual_seed(0)
    layers = {n: host.applied_targets()[n].module for n in names}
    inputs = {n: _layer_input(layer, g) for n, layer in layers.items()}
    outputs = {}
    for mode in (MERGE, BYPASS):
        engine = Engine(mode=mode)
        report = engine.apply(host, [Request(path, WEIGHT, WEIGHT)])
        assert report.applied[0]["modules"] == len(modules) and not report.warnings
        try:
            with torch.no_grad():
                outputs[mode] = {n: layers[n](inputs[n]) for n in names}
            for n in names:
                _check_written(mode, modules[n], layers[n], snap, host.applied_targets()[n].target.webui)
        finally:
            engine.restore(host)
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    for n in names:
        torch.testing.assert_close(outputs[BYPASS][n], outputs[MERGE][n], rtol=1e-4, atol=1e-5)


def _check_written(mode, module, layer, snap, path):
    """Merge mode: the weight (and bias, for types that change it) hold W0 + w * delta; bypass: untouched."""
    w0 = snap[path + ".weight"]
    changes = [("weight", module.delta(w0.shape, w0))]
    b0 = snap.get(path + ".bias")
    if b0 is not None and module.bias_delta(b0.shape) is not None:
        changes.append(("bias", module.bias_delta(b0.shape)))
    assert (len(changes) == 2) == (module.network in ("full", "norm") and b0 is not None)
    for part, delta in changes:
        before, now = snap[f"{path}.{part}"], getattr(layer, part).detach()
        if mode == MERGE:
            torch.testing.assert_close(now, before + WEIGHT * delta, rtol=1e-5, atol=1e-6)
            assert not torch.equal(now, before)
        else:
            assert torch.equal(now, before)


@pytest.mark.parametrize("network", ["full", "norm", "glora"])
def test_a_checkpoint_merge_writes_what_the_engine_applies_biases_and_norms_too(tmp_path, network):
    from safetensors.torch import load_file

    from lora_ext.merge import Item, merge_checkpoint
    from lora_ext import tiny

    model = tiny_model("sd1")
    host = WebuiHost(model)
    ckpt = str(tmp_path / "base.safetensors")
    tiny.save_checkpoint(model, ckpt)
    path = str(tmp_path / f"{network}.safetensors")
    files.write_kohya(path, files.kohya_tensors(make_random_network(model, network)), {"ss_output_name": network})
    result = merge_checkpoint(ckpt, [Item(path, WEIGHT, WEIGHT)], str(tmp_path / "merged.safetensors"), "fp32")
    merged, base = load_file(str(tmp_path / "merged.safetensors")), load_file(ckpt)
    engine = Engine()
    engine.apply(host, [Request(path, WEIGHT, WEIGHT)])
    try:
        live = model.checkpoint_state_dict()
        changed = [k for k in base if not torch.equal(merged[k], base[k])]
        assert len(changed) == result["merged_tensors"] > 0
        assert any(k.endswith(".bias") for k in changed) == (network != "glora")
        for key in base:
            torch.testing.assert_close(merged[key], live[key], rtol=1e-5, atol=1e-6)
    finally:
        engine.restore(host)


def test_bias_and_norm_changes_that_fit_no_layer_are_refused_and_tools_say_what_they_cannot_hold(tmp_path):
    """A diff_b for a layer without a bias (SD's attention q/k/v have none), or a norm change on a Linear, is
    a file made for another model: skipped with 'does not fit', every bit kept. Resize and merge-LoRAs cannot
    hold a bias or a norm change and say so; inspect describes both types."""
    from safetensors.torch import save_file

    from lora_ext.tools import lowrank
    from lora_ext.tools.describe import describe

    model = tiny_model("sd1")
    host = WebuiHost(model)
    q = next(n for n, b in host.lora_targets().items() if n.endswith("attn1_to_q") and b.target.is_unet)
    shape = host.lora_targets()[q].shape
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    for name, parts in {"bias": {f"{q}.diff": torch.ones(shape), f"{q}.diff_b": torch.ones(shape[0])},
                        "norm": {f"{q}.w_norm": torch.ones(shape[0]), f"{q}.b_norm": torch.ones(shape[0])}}.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(parts, path)
        report = Engine().apply(host, [Request(path)])
        assert report.applied == [] and "does not fit the loaded model" in report.warnings[0], report.warnings
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    for network, what in (("full", "bias"), ("norm", "norm layer")):
        modules = make_random_network(model, network)
        with pytest.raises(ValueError, match=f"cannot be resized: it changes a {what}, which a LoRA cannot hold"):
            lowrank.resize(modules, rank=2, shapes={n: host.applied_targets()[n].shape for n in modules})
        path = str(tmp_path / f"random_{network}.safetensors")
        files.write_kohya(path, files.kohya_tensors(modules), {"ss_output_name": network})
        report = describe(path, host.arch)
        assert report["network"] == network and report["rank"] == "full"
        assert report["by_kind"].get("norm") is not None or network == "full"


@pytest.mark.parametrize("network", ["full", "norm"])
def test_a_diffusers_folder_takes_the_same_full_and_norm_files(tmp_path, network):
    """The extra layers (norms, conv_in / conv_out, the time embedding) are bound by their diffusers paths too:
    a file made on the webui layout applies whole to the same model saved as a diffusers folder, and gives
    the same weights there."""
    from lora_ext.hosts.diffusers_host import DiffusersHost
    from test_train import _diffusers_folder

    model = tiny_model("sd1")
    host = DiffusersHost(_diffusers_folder(str(tmp_path / "diffusers"), model))
    modules = make_random_network(model, network)
    path = str(tmp_path / f"{network}.safetensors")
    files.write_kohya(path, files.kohya_tensors(modules), {"ss_output_name": network})
    snap = {k: v.clone() for k, v in host.model.state_dict().items()}
    engine = Engine()
    report = engine.apply(host, [Request(path, WEIGHT, WEIGHT)])
    try:
        assert report.applied[0]["modules"] == len(modules) and not report.warnings
        for name, bound in host.applied_targets().items():
            if name in modules and bound.target.qkv is None:
                w0 = snap[bound.target.diffusers + ".weight"]
                torch.testing.assert_close(bound.param.detach(), w0 + WEIGHT * modules[name].delta(w0.shape, w0))
    finally:
        engine.restore(host)
    assert all(torch.equal(v, snap[k]) for k, v in host.model.state_dict().items())


def test_every_registered_type_and_layout_draws_a_random_network():
    """The parametrized checks above take their cases from the registry (networks/kinds): each type and layout
    draws modules on the tiny SD1 model, of that type, so none of them passes by testing nothing."""
    from lora_ext.networks.kinds import TYPES

    model = tiny_model("sd1")
    assert {t.name for t in TYPES} <= set(NETWORKS)
    for network in NETWORKS:
        modules = make_random_network(model, network, conv=network not in LINEAR_ONLY)
        kind = next(t.name for t in TYPES if network in (t.name, *t.layouts))
        assert modules and {m.network for m in modules.values()} == {kind}, network
