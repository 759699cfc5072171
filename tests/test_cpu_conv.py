"""The CPU convolution kernels (train.cpu_conv): each GEMM kernel gives oneDNN's output and input gradient, the
rule sends the shapes measured faster on a GEMM there (fp32 and bf16 apart), trained weights and other dtypes
stay on oneDNN, and a training session leaves the host's convolutions as they were."""
import pytest
import torch
from torch import nn

from lora_ext.train import cpu_conv
from lora_ext.train.session import HostSession


def _layer(ci=8, co=6, k=3, **kw):
    torch.manual_seed(0)
    return nn.Conv2d(ci, co, k, padding=k // 2, **kw).requires_grad_(False)


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("stride", [1, 2])
def test_each_gemm_kernel_agrees_with_onednn_on_output_and_input_gradient(dtype, tol, stride):
    layer = _layer(stride=stride)
    got = {}
    for name, kernel in (("onednn", cpu_conv._onednn), ("gemm", cpu_conv.GEMM[dtype])):
        x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with _autocast(dtype):
            y = kernel(x, layer, dtype)
        (y.float() * torch.arange(y.numel()).view_as(y) / y.numel()).sum().backward()
        assert y.dtype == dtype
        got[name] = (y.detach().float(), x.grad)
    for a, b in zip(got["onednn"], got["gemm"]):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


# (in channels, size, kernel, stride): SD's layers as bench/cpu_conv.py measured them on a 2-core Xeon
FP32_WON = [(1280, 16, 3, 1), (1280, 8, 3, 1), (1280, 4, 3, 1), (1920, 16, 3, 1), (2560, 8, 3, 1), (1280, 8, 3, 2),
            (640, 16, 3, 2)]
FP32_LOST = [(320, 64, 3, 1), (320, 32, 3, 1), (640, 32, 3, 1), (640, 16, 3, 1), (1280, 32, 3, 1), (960, 32, 3, 1),
             (2560, 8, 1, 1), (4, 32, 3, 1), (32, 4, 3, 1)]
BF16_WON = [(1280, 8, 3, 1), (2560, 8, 3, 1), (1280, 4, 3, 1), (2560, 4, 3, 1)]
BF16_LOST = [(1280, 16, 3, 1), (1920, 16, 3, 1), (640, 16, 3, 1), (320, 32, 3, 1), (1280, 32, 3, 1), (2560, 8, 1, 1)]


@pytest.mark.parametrize("dtype,won,lost", [(torch.float32, FP32_WON, FP32_LOST),
                                             (torch.bfloat16, BF16_WON, BF16_LOST)])
def test_deep_layers_at_small_sizes_go_to_a_gemm_and_the_rest_to_onednn(dtype, won, lost):
    for shapes, expected in ((won, "gemm"), (lost, "onednn")):
        for c, size, k, stride in shapes:
            layer = nn.Conv2d(c, 8, k, padding=k // 2, stride=stride, device="meta")
            assert cpu_conv.kernel_name((1, c, size, size), layer, dtype) == expected, (dtype, c, size, k, stride)
    assert cpu_conv.kernel_name((1, 2560, 4, 4), nn.Conv2d(2560, 8, 3, device="meta"), torch.float16) == "onednn"


def _deep():
    torch.manual_seed(0)
    return nn.Conv2d(512, 4, 3, padding=1).requires_grad_(False)      # 4608-deep: fp32 GEMM up to 10x10, bf16 5x5


@pytest.mark.parametrize("dtype,small,large", [(torch.float32, 8, 16), (torch.bfloat16, 4, 8)])
def test_the_kernel_follows_the_shape_and_dtype_and_the_summary_counts_shapes(dtype, small, large):
    chooser, layer = cpu_conv.Chooser(), _deep()
    x = torch.randn(1, 512, small, small, requires_grad=True)
    with _autocast(dtype):
        y = chooser.forward(layer, x)
        chooser.forward(layer, x)
        expected = cpu_conv._onednn(x, layer)
        chooser.forward(layer, torch.randn(1, 512, large, large))
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert sorted(chooser.choices.values()) == ["gemm", "onednn"]
    assert {k[-1] for k in chooser.choices} == {dtype}
    assert "1 of 2 layer shapes" in chooser.summary()


def test_trained_weights_fp16_and_mixed_dtypes_without_autocast_stay_on_onednn():
    chooser = cpu_conv.Chooser()
    chooser.forward(_deep().half(), torch.randn(1, 512, 4, 4, dtype=torch.float16))
    layer = _deep()
    layer.weight.requires_grad_(True)
    chooser.forward(layer, torch.randn(1, 512, 4, 4))
    with pytest.raises(RuntimeError):       # as oneDNN has it: no silent cast without autocast
        chooser.forward(_deep().to(torch.bfloat16), torch.randn(1, 512, 4, 4))
    assert chooser.choices == {} and chooser.summary() is None


def test_only_plain_fp32_and_bf16_convolutions_are_patched():
    root = nn.Sequential(_layer(), _layer(groups=2, ci=8, co=8), _layer(dilation=2), _layer(padding_mode="reflect"),
                         nn.Conv2d(8, 8, 3, padding="same"), _layer().half(), _layer().bfloat16(), nn.Linear(4, 4))
    patched = [m for m, _ in cpu_conv.conv_patches(root, cpu_conv.Chooser())]
    assert patched == [root[0], root[6]]


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
