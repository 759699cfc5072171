"""The CPU convolution kernel chooser (train.cpu_conv): both kernels give the same output and input gradient,
the rule sends the shapes measured faster on thnn there, half dtypes and trained weights stay on oneDNN, and a
training session leaves the host's convolutions as they were."""
import torch
from torch import nn

from lora_ext.train import cpu_conv
from lora_ext.train.session import HostSession


def _layer(ci=8, co=6, k=3, **kw):
    torch.manual_seed(0)
    return nn.Conv2d(ci, co, k, padding=k // 2, **kw).requires_grad_(False)


def test_kernels_agree_on_output_and_input_gradient():
    layer = _layer(stride=2)
    grads = {}
    for name, kernel in cpu_conv.KERNELS.items():
        x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        y = kernel(x, layer)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        grads[name] = (y.detach(), x.grad)
    for a, b in zip(grads["onednn"], grads["thnn"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_deep_layers_at_small_sizes_go_to_thnn_and_the_rest_to_onednn():
    """The rule against the shapes bench/cpu_conv.py measured (SD's layers: thnn won at 0.2-0.9 of oneDNN's
    time on the first group, tied or lost on the second)."""
    won = [(1280, 16, 3, 1), (1280, 8, 3, 1), (1280, 4, 3, 1), (1920, 16, 3, 1), (2560, 8, 3, 1), (1280, 8, 3, 2),
           (640, 16, 3, 2)]
    lost = [(320, 64, 3, 1), (320, 32, 3, 1), (640, 32, 3, 1), (640, 16, 3, 1), (1280, 32, 3, 1), (960, 32, 3, 1),
            (2560, 8, 1, 1), (4, 32, 3, 1), (32, 4, 3, 1)]
    for shapes, expected in ((won, "thnn"), (lost, "onednn")):
        for c, size, k, stride in shapes:
            layer = nn.Conv2d(c, 8, k, padding=k // 2, stride=stride, device="meta")
            assert cpu_conv.kernel_name((1, c, size, size), layer) == expected, (c, size, k, stride)


def _deep():
    torch.manual_seed(0)
    return nn.Conv2d(512, 4, 3, padding=1).requires_grad_(False)      # 4608-deep reduction: thnn up to 10x10


def test_the_kernel_follows_the_shape_and_the_summary_counts_shapes():
    chooser, layer = cpu_conv.Chooser(), _deep()
    x = torch.randn(1, 512, 8, 8, requires_grad=True)
    y = chooser.forward(layer, x)
    chooser.forward(layer, x)
    torch.testing.assert_close(y, cpu_conv._onednn(x, layer), rtol=1e-5, atol=1e-5)
    chooser.forward(layer, torch.randn(1, 512, 16, 16))
    assert sorted(chooser.choices.values()) == ["onednn", "thnn"]
    assert "1 of 2 layer shapes" in chooser.summary()


def test_half_dtypes_and_trained_weights_stay_on_onednn():
    chooser = cpu_conv.Chooser()
    chooser.forward(_deep().to(torch.bfloat16), torch.randn(1, 512, 8, 8, dtype=torch.bfloat16))
    layer = _deep()
    layer.weight.requires_grad_(True)
    chooser.forward(layer, torch.randn(1, 512, 8, 8))
    assert chooser.choices == {} and chooser.summary() is None


def test_only_plain_fp32_convolutions_are_patched():
    root = nn.Sequential(_layer(), _layer(groups=2, ci=8, co=8), _layer(dilation=2), _layer(padding_mode="reflect"),
                         nn.Conv2d(8, 8, 3, padding="same"), _layer().half(), nn.Linear(4, 4))
    patched = [m for m, _ in cpu_conv.conv_patches(root, cpu_conv.Chooser())]
    assert patched == [root[0]]


def test_a_session_puts_the_layers_back():
    root = nn.Sequential(_layer(), nn.ReLU(), _layer(ci=6))
    before = {k: v.clone() for k, v in root.state_dict().items()}
    x = torch.randn(1, 8, 8, 8)
    expected = root(x)
    chooser = cpu_conv.Chooser()
    with HostSession(root, patches=cpu_conv.conv_patches(root, chooser)):
        x.requires_grad_(True)
        got = root(x)
        got.sum().backward()
    assert len(chooser.choices) == 2        # both layers went through the chooser
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in root.modules())
    assert all(torch.equal(v, before[k]) for k, v in root.state_dict().items())
