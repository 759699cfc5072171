"""The LoRA module and the per-type math, across layer kinds x dtypes (LyCORIS-style matrix)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_ext.networks import functional as fn
from lora_ext.networks.kinds.lora import LoRAModule as _LoRAModule
from lora_ext.networks.kinds.trainable import Geometry, Options
from lora_ext.networks.stored import StoredModule

def LoRAModule(layer, rank, alpha=None, **options):
    return _LoRAModule(Geometry.of(layer), rank, alpha, Options(**options))


LAYERS = {
    "linear": lambda: nn.Linear(24, 40),
    "conv1x1": lambda: nn.Conv2d(16, 24, 1),
    "conv3x3": lambda: nn.Conv2d(16, 24, 3, padding=1),
    "conv3x3_stride2": lambda: nn.Conv2d(16, 16, 3, stride=2, padding=1),   # an ldm Downsample
}
DTYPES = {"fp32": (torch.float32, 1e-5), "fp64": (torch.float64, 1e-10), "bf16": (torch.bfloat16, 3e-2)}


def _input(layer, dtype):
    g = torch.Generator().manual_seed(0)
    shape = (3, 7, layer.in_features) if isinstance(layer, nn.Linear) else (2, layer.in_channels, 8, 8)
    return torch.randn(shape, generator=g).to(dtype)


def _merged_forward(layer, weight, x):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_forward_delta_equals_merged_weight_delta(kind, dtype):
    torch.manual_seed(0)
    dt, tol = DTYPES[dtype]
    layer = LAYERS[kind]().to(dt)
    lora = LoRAModule(layer, rank=4, alpha=2.0).to(dt)
    nn.init.normal_(lora.lora_up.weight, std=0.1)
    x = _input(layer, dt)
    bypass = layer(x) + lora(x)
    merged = _merged_forward(layer, layer.weight + lora.weight_delta(), x)
    assert bypass.shape == merged.shape
    torch.testing.assert_close(bypass.float(), merged.float(), rtol=tol, atol=tol)
    # the stored form (what files hold) gives the same delta through the shared interface
    torch.testing.assert_close(StoredModule.of(lora).delta(layer.weight.shape).to(dt).float(), lora.weight_delta().float(),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fresh_module_changes_nothing_and_follows_kohya_init(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    lora = LoRAModule(layer, rank=8)
    assert torch.count_nonzero(lora.lora_up.weight) == 0
    assert float(lora.alpha) == 8.0 and lora.scale == 1.0           # alpha defaults to the rank
    bound = 1 / math.sqrt(lora.lora_down.weight[0].numel())          # kaiming_uniform(a=sqrt(5)) bound
    assert lora.lora_down.weight.abs().max() <= bound + 1e-6
    assert lora.lora_down.weight.std() > bound / 3
    x = _input(layer, torch.float32)
    assert torch.count_nonzero(lora(x)) == 0
    assert set(lora.state_dict()) == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert LoRAModule(layer, rank=8, alpha=4).scale == 0.5


def test_dropouts_only_in_training_and_rank_dropout_keeps_expectation():
    torch.manual_seed(0)
    layer = nn.Linear(32, 32)
    lora = LoRAModule(layer, rank=16, alpha=16, rank_dropout=0.5)
    nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(4000, 32)
    lora.eval()
    full = lora(x)
    lora.train()
    dropped = lora(x)
    assert not torch.equal(full, dropped)
    ratio = (dropped * full).sum() / (full * full).sum()         # unbiased: rescaled by 1 / (1 - p)
    assert 0.85 < float(ratio) < 1.15
    always = LoRAModule(layer, rank=4, module_dropout=1.0)
    nn.init.normal_(always.lora_up.weight)
    always.train()
    assert torch.count_nonzero(always(x)) == 0
    always.eval()
    assert torch.count_nonzero(always(x)) > 0


def test_locon_with_cp_core_matches_conv_composition():
    g = torch.Generator().manual_seed(1)
    down, mid, up = torch.randn(3, 8, 1, 1, generator=g), torch.randn(3, 3, 3, 3, generator=g), torch.randn(5, 3, 1, 1, generator=g)
    x = torch.randn(1, 8, 6, 6, generator=g)
    composed = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    delta = fn.lora_weight_delta(up, down, 1.0, mid)
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), composed, rtol=1e-4, atol=1e-5)


def test_lokr_and_loha_shapes_for_conv():
    g = torch.Generator().manual_seed(2)
    m = StoredModule.from_parts({"lokr_w1": torch.randn(2, 2, generator=g), "lokr_w2": torch.randn(4, 3, 3, 3, generator=g)})
    assert m.delta((8, 6, 3, 3)).shape == (8, 6, 3, 3) and m.scale == 1.0 and m.is_conv
    h = StoredModule.from_parts({"hada_w1_a": torch.randn(8, 2), "hada_w1_b": torch.randn(2, 6 * 9),
                                 "hada_w2_a": torch.randn(8, 2), "hada_w2_b": torch.randn(2, 6 * 9), "alpha": torch.tensor(1.0)})
    assert h.delta((8, 6, 3, 3)).shape == (8, 6, 3, 3) and h.scale == 0.5


def test_delta_of_the_wrong_size_is_refused():
    from lora_ext.networks.stored import BadModule

    m = StoredModule.from_parts({"lora_down.weight": torch.randn(2, 10), "lora_up.weight": torch.randn(6, 2)})
    with pytest.raises(BadModule, match="elements"):
        m.delta((6, 12))


def test_lora_refuses_other_layers_and_zero_rank():
    with pytest.raises(TypeError):
        LoRAModule(nn.LayerNorm(4), 2)
    with pytest.raises(ValueError):
        LoRAModule(nn.Linear(4, 4), 0)
