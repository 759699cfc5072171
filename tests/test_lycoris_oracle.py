"""The LyCORIS reference implementation (the `lycoris-lora` package, test-only) as the oracle for every type we
train: a module it makes reads in ours with the same weight change, a module we make loads in it with the same
change, and our forward equals its forward on the same weights; across types x layer kinds x options."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

# a plain import, not importorskip: without the oracle these tests must fail, not vanish (.ci/setup installs it)
from lycoris.functional import factorization
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

from lora_ext.networks import functional as fn
from lora_ext.networks.kinds import BY_NAME
from lora_ext.networks.kinds.trainable import Geometry, Options
from lora_ext.networks.stored import BadModule, StoredModule

LAYERS = {
    "linear": lambda: nn.Linear(48, 40),
    "conv1x1": lambda: nn.Conv2d(32, 24, 1),
    "conv3x3": lambda: nn.Conv2d(16, 24, 3, padding=1),
    "conv3x3_stride2": lambda: nn.Conv2d(16, 16, 3, stride=2, padding=1),
}
# (our type, LyCORIS class, options): ours are Options fields, LyCORIS's its keyword arguments
VARIANTS = {
    "locon": ("lora", LoConModule, {}, {}),
    "locon_tucker": ("lora", LoConModule, {"tucker": True}, {"use_tucker": True}),
    "dora": ("lora", LoConModule, {"dora": True}, {"weight_decompose": True, "wd_on_out": False}),
    "dora_on_output": ("lora", LoConModule, {"dora": True, "dora_on_output": True},
                       {"weight_decompose": True, "wd_on_out": True}),
    "loha": ("loha", LohaModule, {}, {}),
    "loha_tucker": ("loha", LohaModule, {"tucker": True}, {"use_tucker": True}),
    "loha_dora": ("loha", LohaModule, {"dora": True}, {"weight_decompose": True, "wd_on_out": False}),
    "lokr": ("lokr", LokrModule, {}, {}),
    "lokr_factor4": ("lokr", LokrModule, {"factor": 4}, {"factor": 4}),
    "lokr_decompose_both": ("lokr", LokrModule, {"decompose_both": True, "factor": 2}, {"decompose_both": True, "factor": 2}),
    "lokr_full_matrix": ("lokr", LokrModule, {"full_matrix": True}, {"full_matrix": True}),
    "lokr_tucker": ("lokr", LokrModule, {"tucker": True, "factor": 2}, {"use_tucker": True, "factor": 2}),
    "lokr_dora": ("lokr", LokrModule, {"dora": True}, {"weight_decompose": True, "wd_on_out": False}),
}
RANK, ALPHA = 4, 2.0


def _randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "dora_scale":        # the magnitude stays near the layer's norms, as in training
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            else:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))


def _theirs(variant: str, layer: nn.Module):
    _, cls, _, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    return cls("lora_unet_x", layer, 1.0, RANK, ALPHA, **kwargs)


def _ours(variant: str, layer: nn.Module):
    network, _, options, _ = VARIANTS[variant]
    return BY_NAME[network].trainable()(Geometry.of(layer), RANK, ALPHA, Options(**options), layer.weight)


def _their_delta(module, layer) -> torch.Tensor:
    """The weight change LyCORIS's forward (its training) makes: alpha/rank applied once, as the webui's built-in
    Lora applies it. (Its get_diff_weight / get_merged_weight apply it twice for LoHa and LoKr in 4.1.3: a
    helper, not what training or any loader computes.)"""
    w0 = layer.weight
    if isinstance(module, LoConModule):
        diff = module.make_weight(w0.device) * module.scale
    else:
        diff = module.get_weight(module.shape)
    diff = diff.reshape(w0.shape)
    return module.apply_weight_decompose(w0 + diff, 1) - w0 if module.wd else diff


def _input(layer) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    shape = (3, layer.in_features) if isinstance(layer, nn.Linear) else (2, layer.in_channels, 8, 8)
    return torch.randn(shape, generator=g)


def _applies(variant: str, layer_kind: str) -> bool:
    # LyCORIS makes a Tucker core only for kxk kernels; a 1x1 conv or a Linear with tucker is the plain variant
    return "tucker" not in variant or layer_kind.startswith("conv3x3")


CASES = [(v, k) for v in VARIANTS for k in LAYERS if _applies(v, k)]


@pytest.mark.parametrize("dims", [(-1,), (2,), (4,), (8,), (16,)])
def test_lokr_factorization_matches_lycoris(dims):
    factor = dims[0]
    for d in range(1, 1300):
        assert fn.factorize(d, factor) == factorization(d, factor), (d, factor)


@pytest.mark.parametrize("variant,layer_kind", CASES)
def test_a_module_lycoris_makes_reads_in_ours_with_its_delta(variant, layer_kind):
    layer = LAYERS[layer_kind]()
    theirs = _theirs(variant, layer)
    _randomize(theirs, 1)
    parts = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    stored = StoredModule.from_parts(parts)
    assert stored.network == VARIANTS[variant][0]
    ours = stored.delta(layer.weight.shape, layer.weight.detach())
    torch.testing.assert_close(ours, _their_delta(theirs, layer).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant,layer_kind", CASES)
def test_a_module_we_make_loads_in_lycoris_with_our_delta(variant, layer_kind):
    layer = LAYERS[layer_kind]()
    ours = _ours(variant, layer)
    _randomize(ours, 2)
    theirs = _theirs(variant, layer)
    stored = StoredModule.of(ours)
    # exactly the parts LyCORIS makes for these options: same names, same shapes
    their_parts = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k != "alpha"}
    assert {k: tuple(v.shape) for k, v in stored.parts.items()} == their_parts
    theirs.load_state_dict({**stored.parts, "alpha": ours.alpha.clone()})
    assert float(theirs.scale) == pytest.approx(ours.scale)
    torch.testing.assert_close(ours.weight_delta(layer.weight).detach(), _their_delta(theirs, layer).detach(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant,layer_kind", CASES)
def test_our_forward_equals_lycoris_forward(variant, layer_kind):
    layer = LAYERS[layer_kind]()
    ours = _ours(variant, layer)
    _randomize(ours, 3)
    x = _input(layer)
    with torch.no_grad():
        our_out = layer(x) + ours(x, layer.weight)
        theirs = _theirs(variant, layer)
        theirs.load_state_dict({**StoredModule.of(ours).parts, "alpha": ours.alpha.clone()})
        theirs.apply_to()
        their_out = layer(x)
    torch.testing.assert_close(our_out, their_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fresh_modules_change_nothing(variant):
    """Each type's init (the one LyCORIS uses) leaves the layer as it was: training starts from the model."""
    for kind, make in LAYERS.items():
        layer = make()
        ours = _ours(variant, layer)
        torch.testing.assert_close(ours.weight_delta(layer.weight).detach(), torch.zeros_like(layer.weight),
                                   rtol=0, atol=1e-6)
        assert any(p.abs().sum() > 0 for p in ours.parameters()), "every factor zero: nothing could learn"


def test_lokr_with_both_factors_full_is_not_scaled_by_alpha():
    layer = nn.Linear(16, 16)
    ours = _ours("lokr_full_matrix", layer)
    theirs = _theirs("lokr_full_matrix", layer)
    assert ours.scale == 1.0 == float(theirs.scale)
    assert StoredModule.from_parts({**StoredModule.of(ours).parts, "alpha": ours.alpha}).scale == 1.0


def test_dora_follows_the_builtin_axis_and_reads_lycoris_output_axis_by_shape():
    """Where LyCORIS and the webui's built-in Lora differ (DoRA's axis), the files we write take the built-in's
    (one magnitude per input channel, [1, in, ...]); a LyCORIS default file ([out, 1, ...], wd_on_output) is read
    by its shape, as LyCORIS means it, where the built-in's formula would broadcast it into another weight."""
    layer = nn.Linear(48, 40)
    ours = _ours("dora", layer)
    assert tuple(ours.dora_scale.shape) == (1, 48)
    theirs = _theirs("dora_on_output", layer)
    _randomize(theirs, 4)
    parts = {k: v.detach() for k, v in theirs.state_dict().items()}
    assert tuple(parts["dora_scale"].shape) == (40, 1)
    stored = StoredModule.from_parts(parts)
    w0 = layer.weight.detach()
    ours_delta = stored.delta(w0.shape, w0)
    torch.testing.assert_close(ours_delta, _their_delta(theirs, layer).detach(), rtol=1e-4, atol=1e-5)
    merged = w0 + StoredModule(stored.network, {k: v for k, v in parts.items() if k not in ("dora_scale", "alpha")},
                               stored.alpha).delta(w0.shape)
    builtin_norm = merged.transpose(0, 1).reshape(48, -1).norm(dim=1, keepdim=True).reshape(48, 1).transpose(0, 1)
    builtin = merged * (parts["dora_scale"] / builtin_norm) - w0
    assert not torch.allclose(builtin, ours_delta, atol=1e-3)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("variant", ["loha", "loha_tucker", "lokr", "lokr_tucker", "dora", "locon_tucker"])
def test_forward_equals_merged_weight_across_layers_and_dtypes(variant, dtype, tol):
    for kind, make in LAYERS.items():
        if not _applies(variant, kind):
            continue
        layer = make().to(dtype)
        ours = _ours(variant, layer).to(dtype)
        _randomize(ours, 6)
        x = _input(layer).to(dtype)
        with torch.no_grad():
            bypass = layer(x) + ours(x, layer.weight)
            w = layer.weight + ours.weight_delta(layer.weight).to(dtype)
            merged = F.linear(x, w, layer.bias) if isinstance(layer, nn.Linear) else \
                F.conv2d(x, w, layer.bias, layer.stride, layer.padding)
        torch.testing.assert_close(bypass.float(), merged.float(), rtol=tol, atol=tol)


# --- the types we apply and do not train: LyCORIS makes the module, ours reads its file ----------------------
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402
from lycoris.modules.ia3 import IA3Module  # noqa: E402

OFT_LAYERS = {      # BOFT's butterfly needs a power-of-two share of the output channels
    "linear": lambda: nn.Linear(24, 32),
    "conv1x1": lambda: nn.Conv2d(16, 32, 1),
    "conv3x3": lambda: nn.Conv2d(16, 64, 3, padding=1),
}
APPLIED = {     # id: (our type, LyCORIS class, its keyword arguments)
    "ia3": ("ia3", IA3Module, {}),
    "ia3_on_input": ("ia3", IA3Module, {"train_on_input": True}),
    "oft": ("oft", DiagOFTModule, {}),
    "oft_constrained": ("oft", DiagOFTModule, {"constraint": 1e-4}),
    "oft_rescaled": ("oft", DiagOFTModule, {"rescaled": True}),
    "boft": ("oft", ButterflyOFTModule, {}),
    "boft_constrained_rescaled": ("oft", ButterflyOFTModule, {"constraint": 1e-4, "rescaled": True}),
}


@pytest.mark.parametrize("layer_kind", sorted(OFT_LAYERS))
@pytest.mark.parametrize("variant", sorted(APPLIED))
def test_an_ia3_oft_or_boft_module_lycoris_makes_reads_in_ours_with_its_delta(variant, layer_kind):
    network, cls, kwargs = APPLIED[variant]
    layer = OFT_LAYERS[layer_kind]()
    torch.manual_seed(0)
    theirs = cls("lora_unet_x", layer, 1.0, 4, 1.0, **kwargs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if name == "rescale" else 0.2))
    parts = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    stored = StoredModule.from_parts(parts)
    w0 = layer.weight.detach()
    assert stored.network == network and stored.fits(w0.shape) and stored.needs_base
    theirs_delta = theirs.get_diff_weight(multiplier=1)[0].reshape(w0.shape).detach()
    torch.testing.assert_close(stored.delta(w0.shape, w0), theirs_delta, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(theirs_delta, torch.zeros_like(theirs_delta))


def test_ia3_on_a_convolution_follows_lycoris_where_the_builtin_cannot_broadcast():
    """The built-in reshapes an output-channel IA3 factor to [out, 1], which broadcasts over a Linear weight but
    not over a conv kernel [out, in, kh, kw]; LyCORIS means one factor per output channel, and so do we."""
    layer = nn.Conv2d(16, 32, 3, padding=1)
    theirs = IA3Module("lora_unet_x", layer, 1.0, 4, 1.0)
    with torch.no_grad():
        theirs.weight.normal_(0, 0.2)
    parts = {k: v.detach() for k, v in theirs.state_dict().items()}
    w0 = layer.weight.detach()
    with pytest.raises(RuntimeError):
        w0 * parts["weight"].reshape(-1, 1)          # the built-in's formula
    ours = StoredModule.from_parts(parts).delta(w0.shape, w0)
    torch.testing.assert_close(ours, w0 * parts["weight"].reshape(32, 1, 1, 1) * 1.0)
    torch.testing.assert_close(ours, theirs.get_diff_weight(1)[0].detach())


# --- GLoRA: LyCORIS writes the current layout; the first layout is read as the webui's built-in reads it --------
from lycoris.modules.glora import GLoRAModule  # noqa: E402

from lora_ext.networks.kinds.glora import is_old_layout  # noqa: E402

GLORA_LAYERS = {**LAYERS, "square_linear": lambda: nn.Linear(32, 32), "conv3x3_tucker": lambda: nn.Conv2d(16, 24, 3, padding=1)}


def _their_glora(layer_kind: str, alpha: float = ALPHA):
    layer = GLORA_LAYERS[layer_kind]()
    torch.manual_seed(0)
    theirs = GLoRAModule("lora_unet_x", layer, 1.0, RANK, alpha, use_tucker=layer_kind.endswith("tucker"))
    _randomize(theirs, 3)
    return layer, theirs, {k: v.detach().clone() for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("layer_kind", sorted(GLORA_LAYERS))
def test_a_glora_module_lycoris_makes_reads_in_ours_with_its_delta_and_forward(layer_kind):
    layer, theirs, parts = _their_glora(layer_kind)
    stored = StoredModule.from_parts(parts)
    w0 = layer.weight.detach()
    assert stored.network == "glora" and not is_old_layout(parts) and stored.rank == RANK
    assert stored.fits(w0.shape) and stored.needs_base and stored.low_rank() is None
    assert stored.is_conv == (w0.ndim == 4 and w0.shape[-1] > 1)
    theirs_delta = theirs.get_diff_weight(multiplier=1)[0].reshape(w0.shape).detach()
    ours = stored.delta(w0.shape, w0)
    torch.testing.assert_close(ours, theirs_delta, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(theirs_delta, torch.zeros_like(theirs_delta))
    x = _input(layer)
    theirs.apply_to()
    with torch.no_grad():
        op = F.linear if w0.ndim == 2 else (lambda x, w, b: F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding))
        torch.testing.assert_close(op(x, w0 + ours, layer.bias), theirs(x), rtol=1e-4, atol=1e-4)
    other = {"linear": (40, 47), "conv1x1": (24, 33, 1, 1)}.get(layer_kind)
    if other:
        assert not stored.fits(other)


@pytest.mark.parametrize("layer_kind", ["linear", "square_linear", "conv1x1"])
def test_the_first_glora_layout_is_applied_as_the_builtin_applies_it(layer_kind):
    """The first GLoRA files hold the same four matrices the other way round (a1 [r, in], a2 [in, r], b1
    [r, in], b2 [out, r]). The webui's built-in computes b2 @ b1 + W0 @ a2 @ a1 and leaves alpha out (its
    GLoRA has no rank): we follow it, so alpha = 2 * r changes nothing here, where LyCORIS's current layout
    would double. The same numbers as LyCORIS's layout at alpha = r give LyCORIS's delta."""
    layer, theirs, new = _their_glora(layer_kind, alpha=float(RANK))
    flat = {k: v.reshape(v.shape[0], -1) for k, v in new.items() if k != "alpha"}
    old = {"a1.weight": flat["a2.weight"], "a2.weight": flat["a1.weight"], "b1.weight": flat["b2.weight"],
           "b2.weight": flat["b1.weight"], "alpha": torch.tensor(2.0 * RANK)}
    stored = StoredModule.from_parts(old)
    w0 = layer.weight.detach()
    assert is_old_layout(old) and stored.rank == RANK and stored.fits(w0.shape)
    builtin = old["b2.weight"] @ old["b1.weight"] + (w0.reshape(w0.shape[0], -1) @ old["a2.weight"]) @ old["a1.weight"]
    ours = stored.delta(w0.shape, w0)
    torch.testing.assert_close(ours, builtin.reshape(w0.shape), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, theirs.get_diff_weight(1)[0].reshape(w0.shape).detach(), rtol=1e-4, atol=1e-5)
    assert not stored.fits((w0.shape[0], w0.shape[1], 3, 3))      # W0 @ a2 cannot take a kxk kernel


def test_glora_parts_that_share_no_rank_are_refused_by_name():
    parts = {"a1.weight": torch.ones(8, 4), "a2.weight": torch.ones(3, 8), "b1.weight": torch.ones(6, 4),
             "b2.weight": torch.ones(4, 8)}
    with pytest.raises(BadModule, match="GLoRA a1 \\[8, 4\\], a2 \\[3, 8\\].* share no rank"):
        StoredModule.from_parts(parts)


# --- full (diff) and norm: the change itself, weight and bias -------------------------------------------------
from lycoris.modules.full import FullModule  # noqa: E402
from lycoris.modules.norms import NormModule  # noqa: E402

BIAS_LAYERS = {**LAYERS, "linear_no_bias": lambda: nn.Linear(48, 40, bias=False),
               "groupnorm": lambda: nn.GroupNorm(4, 32), "layernorm": lambda: nn.LayerNorm(40)}


def _layer_op(layer, x, weight, bias):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, stride=layer.stride, padding=layer.padding)
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)


@pytest.mark.parametrize("layer_kind", sorted(BIAS_LAYERS))
def test_a_full_or_norm_module_lycoris_makes_reads_in_ours_with_its_weight_and_bias_change(layer_kind):
    layer = BIAS_LAYERS[layer_kind]()
    norm = layer_kind.endswith("norm")
    w0, b0 = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    theirs = (NormModule if norm else FullModule)("lora_unet_x", layer, 1.0)
    _randomize(theirs, 11)
    theirs.apply_to()       # its file parts are the differences once it is on the layer (full: weight - W0)
    parts = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    stored = StoredModule.from_parts(parts)
    assert stored.network == ("norm" if norm else "full") and stored.rank is None and not stored.needs_base
    assert stored.fits(w0.shape) and stored.fits_bias(None if b0 is None else b0.shape)
    their_w, their_b = theirs.get_diff_weight(multiplier=1)
    torch.testing.assert_close(stored.delta(w0.shape, w0), their_w.reshape(w0.shape).detach())
    assert not torch.allclose(their_w, torch.zeros_like(their_w))
    if b0 is None:
        assert their_b is None and stored.bias_delta((40,)) is None and "diff_b" not in parts
    else:
        torch.testing.assert_close(stored.bias_delta(b0.shape), their_b.reshape(b0.shape).detach())
        assert not stored.fits_bias(None)           # a bias change for a layer without a bias does not fit
    x = (torch.randn(2, 32, 4, 4) if layer_kind == "groupnorm" else torch.randn(3, 40) if norm else _input(layer))
    with torch.no_grad():
        ours = _layer_op(layer, x, w0 + stored.delta(w0.shape, w0),
                         None if b0 is None else b0 + stored.bias_delta(b0.shape))
        torch.testing.assert_close(ours, theirs(x), rtol=1e-4, atol=1e-5)
