"""Headless loading of a single-file checkpoint: tensor by tensor into a model built without random
initialisation, on the run's device, the frozen weights of a mixed-precision run made in its dtype."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import tiny_model
from lora_ext import cli
from lora_ext.hosts.checkpoint import CheckpointError, checkpoint_keys, load_checkpoint
from lora_ext import sample_data, tiny
from lora_ext.train.config import TrainConfig


def _half_checkpoint(model, path) -> dict:
    """The model saved as most checkpoints are shared (fp16); returns what the file holds."""
    tiny.save_checkpoint(model, path)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(path).items()}
    save_file(sd, path)
    return sd


def test_a_checkpoint_loads_tensor_by_tensor_to_the_file_s_values(tmp_path, any_arch):
    """Every weight equals the file's (fp16 widened to the model's fp32); nothing of the skipped random
    initialisation is left behind, in the model or in torch.nn.init."""
    init_before = {n: getattr(nn.init, n) for n in ("kaiming_uniform_", "normal_", "uniform_", "zeros_")}
    path = str(tmp_path / "m.safetensors")
    sd = _half_checkpoint(tiny_model(any_arch), path)
    model = load_checkpoint(path)
    own = model.state_dict()
    compared = 0
    for ckpt_key, model_key in checkpoint_keys(model).items():
        if ckpt_key in sd:
            assert own[model_key].dtype == (torch.float32 if sd[ckpt_key].is_floating_point() else sd[ckpt_key].dtype)
            assert torch.equal(own[model_key], sd[ckpt_key].to(own[model_key].dtype)), ckpt_key
            compared += 1
    assert compared == len([k for k in checkpoint_keys(model) if k in sd]) > 50
    assert {n: getattr(nn.init, n) for n in init_before} == init_before
    assert nn.Linear(3, 3).weight.abs().sum() > 0           # initialisation works again afterwards


def _unet(model) -> list:
    from lora_ext.hosts.webui import WebuiHost
    return [WebuiHost(model).unet]


def test_a_flat_clip_text_model_gets_the_text_model_layout_and_computes_the_same():
    """transformers 5's CLIPTextModel has embeddings / encoder / final_layer_norm on itself, as transformers 4's
    `.text_model` (CLIPTextTransformer) does: v4_layout puts such a model under `.text_model`, where the
    checkpoint keys and kohya's names put it, and leaves a transformers 4 model as it is (tests/test_modern_stack.py
    runs the headless tests on transformers 5 itself)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_ext.hosts.ldm_layout import v4_layout

    model = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))
    flat = getattr(model, "text_model", model)      # transformers 4: its CLIPTextTransformer; 5: the model
    if flat is not model:
        assert v4_layout(model) is model
    wrapped = v4_layout(flat)
    assert wrapped is not flat and wrapped.text_model is flat
    assert list(wrapped.state_dict()) == ["text_model." + k for k in flat.state_dict()]
    assert [n for n, _ in wrapped.named_modules()][1:] == ["text_model" + (n and "." + n) for n, _ in flat.named_modules()]
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 3])
    out = wrapped(ids, output_hidden_states=True)
    assert torch.equal(out.last_hidden_state, flat(ids).last_hidden_state)
    assert len(out.hidden_states) == 3 and wrapped.config is flat.config


@pytest.mark.parametrize("later", [None, _unet], ids=["read_now", "unet_read_later"])
def test_a_file_whose_tensor_does_not_fit_is_refused_naming_it(tmp_path, later):
    path = str(tmp_path / "m.safetensors")
    sd = _half_checkpoint(tiny_model("sd1"), path)
    key = next(k for k in sd if k.endswith("attn1.to_q.weight"))
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1], dtype=torch.float16)
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r" is \["):
        load_checkpoint(path, later=later)


def test_weights_read_later_are_the_file_s_as_it_was_opened(tmp_path):
    """`later`: the UNet's weights are checked at load and read when asked, from the file as it was opened
    (one replaced meanwhile is not read); the rest is read at once; the model then equals one read whole."""
    import os

    from lora_ext.hosts.webui import WebuiHost

    path = str(tmp_path / "m.safetensors")
    _half_checkpoint(tiny_model("sdxl"), path)
    whole = load_checkpoint(path)
    host = WebuiHost(load_checkpoint(path, later=_unet))
    assert WebuiHost(whole).pending is None
    assert host.pending.nbytes == sum(p.numel() * p.element_size() for p in host.unet.parameters()) > 0
    own, want = host.model.state_dict(), whole.state_dict()
    unet_keys = {k for k in own if k.startswith("model.diffusion_model.")}
    assert all(torch.equal(own[k], want[k]) for k in own if k not in unet_keys)
    other = str(tmp_path / "other.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in load_file(path).items()}, other)
    os.replace(other, path)
    host.pending.read()
    assert host.pending is None
    assert all(torch.equal(v, want[k]) and v.dtype == want[k].dtype for k, v in host.model.state_dict().items())


def test_a_file_cut_short_before_its_later_weights_are_read_is_named(tmp_path):
    import os

    from lora_ext.hosts.webui import WebuiHost

    path = str(tmp_path / "m.safetensors")
    _half_checkpoint(tiny_model("sd1"), path)
    host = WebuiHost(load_checkpoint(path, later=_unet))
    pending = host.pending
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="m.safetensors: .*the file ended inside its data"):
        pending.read()
    assert pending.done and host.pending is None          # its file closed, nothing read twice


def _kept_but_the_decoder(before: dict, after: dict) -> None:
    """A headless run's own model keeps its weights, but for the VAE decoder it frees (no previews:
    train.leaving)."""
    decoding = {k for k in after if ".decoder." in k or ".post_quant_conv." in k}
    assert decoding and all(after[k].numel() == 0 for k in decoding)
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items() if k not in decoding)


def test_a_mixed_precision_run_loads_its_frozen_weights_in_its_dtype_and_trains(tmp_path, monkeypatch):
    """bf16 on a CPU that has it: the UNet's and text encoder's Linear / Conv weights come from the file
    straight in bf16 (no fp32 copy first), norms, embeddings and the VAE in fp32; the run holds no second copy
    of them (nothing to put back in a headless model) and trains."""
    from lora_ext.train import optim
    from lora_ext.train.loop import train

    monkeypatch.setattr(optim, "cpu_bf16", lambda: "AMX-BF16")
    path = str(tmp_path / "m.safetensors")
    sd = _half_checkpoint(tiny_model("sd1"), path)
    host = cli._host_for(path, "bf16")
    unet, vae = host.unet, host.vae
    assert {m.weight.dtype for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))} == {torch.bfloat16}
    assert {m.weight.dtype for m in unet.modules() if isinstance(m, nn.GroupNorm)} == {torch.float32}
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
    key = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    held = host.model.state_dict()[checkpoint_keys(host.model)[key]]
    assert held.dtype == torch.bfloat16 and torch.equal(held, sd[key].to(torch.bfloat16))
    data = sample_data.make_sample_dataset(str(tmp_path / "data"), size=64, per_concept=2)
    cfg = TrainConfig(train_data_dir=data["train"], caption_extension=".txt", output_dir=str(tmp_path / "out"),
                      resolution="64", max_train_steps=2, network_dim=4, network_alpha=2, mixed_precision="bf16",
                      save_precision="fp32", seed=3)
    before = {k: v.clone() for k, v in host.model.state_dict().items()}
    result = train(host, cfg)
    assert result.steps == 2 and all(loss == loss for loss in result.losses)
    _kept_but_the_decoder(before, host.model.state_dict())


def test_a_headless_run_computes_on_the_process_s_gpu(monkeypatch):
    from lora_ext.train.distributed import local_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device() == torch.device("cpu")


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                                   nn.Conv2d(3, 4, 1, bias=False)], ids=["linear", "conv3x3", "conv1x1"])
def test_a_layer_stored_narrow_computes_in_fp32_and_keeps_only_its_narrow_weight_for_backward(layer):
    """The patched forward gives what fp32 gives on the same (narrow) values, forward and the input's
    gradient, bit for bit; what autograd keeps of the weight is the bf16 tensor, never an fp32 copy."""
    from lora_ext.train.upcast import upcast_patches

    layer = layer.to(torch.bfloat16).requires_grad_(False)
    wide = {k: v.float() for k, v in layer.state_dict().items()}
    reference = (nn.Linear(6, 5) if isinstance(layer, nn.Linear) else
                 nn.Conv2d(3, 4, layer.kernel_size, stride=layer.stride, padding=layer.padding, bias=layer.bias is not None))
    reference.load_state_dict(wide)
    reference.requires_grad_(False)
    (patched, forward), = upcast_patches([layer])
    assert patched is layer
    x = torch.randn((4, 6) if isinstance(layer, nn.Linear) else (2, 3, 9, 9), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = forward(x)
    assert out.dtype == torch.float32 and torch.equal(out, reference(x))
    assert [t.dtype for t in saved] == [torch.bfloat16] and saved[0] is layer.weight
    g = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, g)
    (theirs,) = torch.autograd.grad(reference(x), x, g)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert not upcast_patches([reference])          # an fp32 layer computes as it is


def test_a_deep_narrow_convolution_at_a_small_size_runs_on_the_gemm_kernel(monkeypatch):
    """train.cpu_conv's rule inside the upcast: forward and input gradient on thnn (counted), the bits of an fp32
    layer on thnn (as an fp32 run computes it: cpu_conv's patch, autograd's backward), autograd keeping the
    bf16 weight and the layer's input, never an fp32 copy of the weight; the same layer at a larger size stays
    on oneDNN, fp32's result and input gradient to rounding."""
    from lora_ext.train import cpu_conv
    from lora_ext.train.upcast import upcast_patches

    calls, back = [], []
    thnn, thnn_input_grad = cpu_conv.thnn, cpu_conv.thnn_input_grad
    monkeypatch.setattr(cpu_conv, "thnn", lambda *a: calls.append(a[0].shape) or thnn(*a))
    monkeypatch.setattr(cpu_conv, "thnn_input_grad", lambda *a: back.append(a[1].shape) or thnn_input_grad(*a))
    torch.manual_seed(0)
    layer = nn.Conv2d(512, 4, 3, padding=1).to(torch.bfloat16).requires_grad_(False)    # a GEMM up to 10x10
    reference = nn.Conv2d(512, 4, 3, padding=1).requires_grad_(False)
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    (_, forward), = upcast_patches([layer])
    for size, expected_calls in ((8, 1), (16, 1)):
        x = torch.randn(2, 512, size, size, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = forward(x)
        assert len(calls) == expected_calls and saved[0] is layer.weight
        assert [t is x for t in saved] == [False] + [True] * (size == 8)
        g = torch.randn_like(out)
        grad = torch.autograd.grad(out, x, g)[0]
        assert len(back) == expected_calls
        if size == 8:
            same = thnn(x, reference.weight, reference.bias, reference)
            assert torch.equal(out, same) and torch.equal(grad, torch.autograd.grad(same, x, g)[0])
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, torch.autograd.grad(reference(x), x, g)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_bf16_on_a_cpu_without_it_stores_the_frozen_weights_in_bf16_and_trains_in_fp32(tmp_path, monkeypatch, arch):
    """mixed_precision bf16 headless on a CPU with no bf16 instructions: the frozen Linear / Conv weights
    are loaded in bf16 (half their memory; an nn.MultiheadAttention's out_proj, which it reads directly,
    in fp32), the run computes in fp32 and says so, its losses are an fp32 run's on the same (bf16-rounded)
    weights, and the model's stored weights are left as they were."""
    from lora_ext.train import optim
    from lora_ext.train.loop import train

    monkeypatch.setattr(optim, "cpu_bf16", lambda: None)
    path = str(tmp_path / "m.safetensors")
    _half_checkpoint(tiny_model(arch), path)
    host = cli._host_for(path, "bf16")
    layers = [m for m in host.unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert {m.weight.dtype for m in layers} == {torch.bfloat16}
    tables = [m for name, m in host.model.named_modules() if name.endswith("token_embedding")]
    assert tables and {m.weight.dtype for m in tables} == {torch.bfloat16}
    mha = [m for m in host.model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert bool(mha) == (arch == "sd2") and all(m.out_proj.weight.dtype == torch.float32 for m in mha)
    data = sample_data.make_sample_dataset(str(tmp_path / "data"), size=64, per_concept=2)
    cfg = dict(train_data_dir=data["train"], caption_extension=".txt", resolution="64", max_train_steps=2,
               network_dim=4, network_alpha=2, save_precision="fp32", seed=3)
    before = {k: v.clone() for k, v in host.model.state_dict().items()}
    narrow = train(host, TrainConfig(output_dir=str(tmp_path / "a"), mixed_precision="bf16", **cfg))
    assert any("stored in bfloat16, are cast up to fp32" in m for m in narrow.messages)
    _kept_but_the_decoder(before, host.model.state_dict())
    host.model.float()
    wide = train(host, TrainConfig(output_dir=str(tmp_path / "b"), mixed_precision="no", **cfg))
    assert not any("cast up" in m for m in wide.messages)
    assert narrow.losses == pytest.approx(wide.losses, rel=1e-5)


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_an_fp32_run_can_hold_the_frozen_weights_as_the_file_stores_them_and_trains_as_on_fp32_copies(tmp_path, arch):
    """mixed_precision no, headless on the CPU, an fp16 file, --frozen_weights as_stored: the frozen Linear /
    Conv weights are held in fp16, the file's own values (half the memory of fp32 copies), a weight the file
    stores in fp32 stays fp32, as do norms, the VAE and an nn.MultiheadAttention's out_proj; the run says so,
    and its losses and LoRA are those of a run on fp32 copies (the default, as kohya): the same numbers, cast
    up at use."""
    from lora_ext.train.loop import train

    path = str(tmp_path / "m.safetensors")
    sd = _half_checkpoint(tiny_model(arch), path)
    wide_key = next(k for k in sd if k.endswith("attn1.to_q.weight"))
    sd[wide_key] = sd[wide_key].float()
    save_file(sd, path)
    host = cli._host_for(path, "no", "as_stored")
    own = host.model.state_dict()
    layers = [m for m in host.unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert {m.weight.dtype for m in layers} == {torch.float16, torch.float32}
    assert own[checkpoint_keys(host.model)[wide_key]].dtype == torch.float32
    key = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    assert own[checkpoint_keys(host.model)[key]].dtype == torch.float16
    assert torch.equal(own[checkpoint_keys(host.model)[key]], sd[key])
    assert {m.weight.dtype for m in host.model.modules() if isinstance(m, nn.GroupNorm)} == {torch.float32}
    assert {p.dtype for p in host.vae.parameters()} == {torch.float32}
    mha = [m for m in host.model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert bool(mha) == (arch == "sd2") and all(m.out_proj.weight.dtype == torch.float32 for m in mha)
    # the token embedding table too (a lookup: its rows widen in the sum with the position embedding, kept fp32)
    table = next(k for k in sd if k.endswith("token_embedding.weight"))
    assert own[checkpoint_keys(host.model)[table]].dtype == torch.float16
    assert torch.equal(own[checkpoint_keys(host.model)[table]], sd[table])
    positions = [k for k in sd if "position" in k and k.startswith("cond_stage_model.") and sd[k].is_floating_point()]
    assert positions and all(own[checkpoint_keys(host.model)[k]].dtype == torch.float32 for k in positions)
    wide = cli._host_for(path, "no")
    assert {p.dtype for p in wide.model.parameters()} == {torch.float32}

    data = sample_data.make_sample_dataset(str(tmp_path / "data"), size=64, per_concept=2)
    cfg = dict(train_data_dir=data["train"], caption_extension=".txt", resolution="64", max_train_steps=3,
               network_dim=4, network_alpha=2, mixed_precision="no", save_precision="fp32", seed=3,
               network_args=["conv_dim=2"])
    narrow = train(host, TrainConfig(output_dir=str(tmp_path / "a"), frozen_weights="as_stored", **cfg))
    assert any("stored in float16, are cast up to fp32" in m for m in narrow.messages)
    copies = train(wide, TrainConfig(output_dir=str(tmp_path / "b"), **cfg))
    assert not any("cast up" in m for m in copies.messages)
    # the first loss to the bit; after it to rounding (the input gradient of a layer cast up at use comes from other
    # kernels: conv2d_input, a plain matmul)
    assert narrow.losses[0] == copies.losses[0] and narrow.losses == pytest.approx(copies.losses, rel=1e-6)
    a, b = load_file(narrow.lora_path), load_file(copies.lora_path)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_weights_stored_narrow_recompute_the_blocks_fp32_copies_would(tmp_path, monkeypatch):
    """Checkpointing's margin is a share of the run's memory: as_stored, whose weights take half of it, plans
    as the same run on fp32 copies (it is asked to save memory, not to recompute more blocks for it); without
    that rule some margin recomputes more blocks under as_stored."""
    from lora_ext.train import memory

    path = str(tmp_path / "m.safetensors")
    _half_checkpoint(tiny_model("sd1"), path)
    narrow, wide = cli._host_for(path, "no", "as_stored"), cli._host_for(path, "no", "fp32")
    assert {m.weight.dtype for m in narrow.unet.modules() if isinstance(m, nn.Conv2d)} == {torch.float16}
    cfgs = [TrainConfig(resolution="64", network_dim=4, network_alpha=2, gradient_checkpointing=True,
                        checkpointing_margin=m) for m in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)]
    plans = [memory.estimate(wide, c)["recomputed"] for c in cfgs]
    assert [memory.estimate(narrow, c)["recomputed"] for c in cfgs] == plans
    assert memory.estimate(narrow, cfgs[0])["total"] < memory.estimate(wide, cfgs[0])["total"]
    monkeypatch.setattr(memory, "_widened", lambda upcast: 0)
    assert any(sum(memory.estimate(narrow, c)["recomputed"]) > sum(p) for c, p in zip(cfgs, plans))


def test_an_fp32_file_is_held_in_fp32_and_frozen_weights_is_checked(tmp_path):
    from lora_ext.train.config import ConfigError, from_dict

    path = str(tmp_path / "m.safetensors")
    tiny.save_checkpoint(tiny_model("sd1"), path)
    host = cli._host_for(path, "no", "as_stored")
    assert {p.dtype for p in host.model.parameters()} == {torch.float32}
    with pytest.raises(ConfigError, match="frozen_weights must be as_stored or fp32, not 'fp16'"):
        from_dict({"frozen_weights": "fp16"})


@pytest.mark.parametrize("precision,device,frozen,bf16_cpu,expected", [
    ("no", "cpu", "as_stored", None, {torch.float16: torch.float16, torch.bfloat16: torch.bfloat16, torch.float32: None}),
    ("no", "cpu", "fp32", None, None),
    ("no", "cpu", None, None, None),                # the default: fp32 copies, as kohya
    ("no", "cuda", "as_stored", None, None),       # train.upcast casts up on the CPU only
    ("bf16", "cpu", "fp32", "AMX-BF16", {torch.float16: torch.bfloat16, torch.float32: torch.bfloat16}),
    ("bf16", "cpu", "as_stored", None, {torch.float16: torch.bfloat16, torch.float32: torch.bfloat16}),
    ("fp16", "cpu", "as_stored", None, {torch.bfloat16: torch.float16, torch.float32: torch.float16}),
])
def test_the_dtype_a_headless_run_holds_each_frozen_weight_in(precision, device, frozen, bf16_cpu, expected):
    from lora_ext.train.optim import frozen_storage

    given = {} if frozen is None else {"frozen_weights": frozen}
    dtype_for = frozen_storage(precision, torch.device(device), cpu_has=lambda: bf16_cpu, **given)
    assert (dtype_for is None) == (expected is None)
    for stored, held in (expected or {}).items():
        assert dtype_for(stored) == held
