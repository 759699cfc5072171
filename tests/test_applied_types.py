"""Every network type the engine applies, on the tiny SD1 and SDXL models: merge mode writes W0 + w * delta(W0)
into each layer, bypass mode makes each layer compute what the merged weight computes without touching a
weight, and both give the model back bit-exact."""
import pytest
import torch

from conftest import tiny_model
from lora_ext import files
from lora_ext.apply import BYPASS, MERGE, Engine, Request
from lora_ext.demo import make_random_network
from lora_ext.hosts.webui import WebuiHost

# type -> whether its random file covers conv layers (IA3 and the first GLoRA layout: Linear only)
NETWORKS = {"lora": True, "loha": True, "lokr": True, "ia3": False, "oft": True, "boft": True, "glora": True,
            "glora_v1": False}
WEIGHT = 0.6


def _layer_input(layer, g):
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(2, layer.in_features, generator=g)
    return torch.randn(1, layer.in_channels, 6, 6, generator=g)


def _sampled(host, modules):
    """A few hookable layers of the file: the first and last Linear, the first and last conv."""
    targets = host.lora_targets()
    plain = [n for n in modules if targets[n].target.qkv is None and targets[n].owner is None]
    linear = [n for n in plain if len(targets[n].shape) == 2]
    conv = [n for n in plain if len(targets[n].shape) == 4]
    return [n for group in (linear, conv) if group for n in {group[0], group[-1]}]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_each_type_merges_and_bypasses_alike_and_restores_exactly(tmp_path, arch, network):
    model = tiny_model(arch)
    host = WebuiHost(model)
    modules = make_random_network(model, network, conv=NETWORKS[network])
    path = str(tmp_path / f"{network}.safetensors")
    files.write_kohya(path, files.kohya_tensors(modules), {"ss_output_name": network})
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    names = _sampled(host, modules)
    assert names and (len(names) > 2) == NETWORKS[network]
    g = torch.Generator().manual_seed(0)
    layers = {n: host.lora_targets()[n].module for n in names}
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
                w0 = snap[host.lora_targets()[n].target.webui + ".weight"]
                now = layers[n].weight.detach()
                if mode == MERGE:
                    want = w0 + WEIGHT * modules[n].delta(w0.shape, w0)
                    torch.testing.assert_close(now, want, rtol=1e-5, atol=1e-6)
                    assert not torch.equal(now, w0)
                else:
                    assert torch.equal(now, w0)
        finally:
            engine.restore(host)
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    for n in names:
        torch.testing.assert_close(outputs[BYPASS][n], outputs[MERGE][n], rtol=1e-4, atol=1e-5)
