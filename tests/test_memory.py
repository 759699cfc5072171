"""The memory estimate the Train tab shows: its activation figure against what autograd really keeps with
the LoRA attached, its exact parts, its response to the options, and the host model left as it was."""
import pytest
import torch

from lora_ext.hosts.conditioning import Cond

from conftest import tiny_model
from lora_ext.hosts.ldm_attention import fused_attention_shape_patches, sdpa_patches
from lora_ext.hosts.webui import WebuiHost
from lora_ext.train import memory
from lora_ext.train.config import TrainConfig
from lora_ext.train.network import network_for
from lora_ext.train.network_args import spec
from lora_ext.train.session import HostSession, frozen_roots


def _cfg(**kw):
    base = dict(resolution="128", network_dim=8, train_batch_size=2, mixed_precision="no", text_encoder_lr=0.0)
    return TrainConfig(**{**base, **kw})


def _really_saved(host, cfg, amp=None) -> int:
    """Bytes autograd keeps in one real forward of the UNet with the LoRA attached (weights not counted);
    `amp`: under CPU autocast, the frozen weights held in its dtype, as a run does."""
    network = network_for(host, spec(cfg))
    keep = {id(p) for p in host.model.parameters()} | {id(p) for p in network.parameters()}
    total, seen = [0], {}

    def pack(t):
        # memory per tensor kept (once however often it is saved, views as what they view); weights excluded
        base = t._base if t._base is not None else t
        if id(base) not in keep and id(base) not in seen:
            seen[id(base)] = base
            total[0] += base.numel() * base.element_size()
        return t
    w, h = cfg.size
    with HostSession(host.model, (), sdpa_patches(host.unet), (frozen_roots(host), amp)):
        network.attach()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                host.predict(torch.randn(cfg.train_batch_size, 4, h // 8, w // 8),
                             torch.zeros(cfg.train_batch_size, dtype=torch.long),
                             Cond(torch.randn(cfg.train_batch_size, 77, memory._context_width(host))))
        finally:
            network.detach()
    return total[0]


@pytest.fixture(params=["webui", "diffusers"])
def host(request, tmp_path):
    if request.param == "webui":
        return WebuiHost(tiny_model("sd1"))
    from lora_ext.hosts.diffusers_host import DiffusersHost
    from test_train import _diffusers_folder
    return DiffusersHost(_diffusers_folder(str(tmp_path / "diffusers"), tiny_model("sd1")))


def test_meta_measurement_matches_a_real_forward(host):
    cfg = _cfg()
    trained = {id(b.param) for b in host.lora_targets().values() if b.target.is_unet}
    w, h = cfg.size

    def forward():
        return host.predict(torch.empty(2, 4, h // 8, w // 8, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"),
                            Cond(torch.empty(2, 77, memory._context_width(host), device="meta")))
    with HostSession(host.model, (), fused_attention_shape_patches(host.unet)):
        measured = memory.saved_activations(host, forward, trained, torch.float32, host.checkpoint_blocks())
    real = _really_saved(host, cfg)
    assert abs(measured["total"] - real) / real < 0.15, (measured["total"], real)
    assert len(measured["blocks"]) == len(host.checkpoint_blocks())
    assert 0 < sum(b["saved"] for b in measured["blocks"]) <= measured["total"]


def test_meta_measurement_under_autocast_matches_a_real_bf16_forward():
    """What autograd keeps under CPU bf16 autocast (the frozen weights held in bf16), against the meta count
    with autocast's casts made on meta tensors: the same within 15 %, and well under fp32's."""
    host = WebuiHost(tiny_model("sd1"))
    cfg = _cfg()
    trained = {id(b.param) for b in host.lora_targets().values() if b.target.is_unet}
    w, h = cfg.size

    def forward():
        with memory._AutocastOnMeta(torch.bfloat16):
            return host.predict(torch.empty(2, 4, h // 8, w // 8, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"),
                                Cond(torch.empty(2, 77, memory._context_width(host), device="meta")))
    with HostSession(host.model, (), fused_attention_shape_patches(host.unet)):
        measured = memory.saved_activations(host, forward, trained, torch.bfloat16, host.checkpoint_blocks())
    real = _really_saved(host, cfg, torch.bfloat16)
    assert abs(measured["total"] - real) / real < 0.15, (measured["total"], real)
    assert real < 0.8 * _really_saved(host, cfg)


def test_estimate_parts_and_options():
    host = WebuiHost(tiny_model("sd1"))
    est = memory.estimate(host, _cfg())
    network = network_for(host, spec(_cfg()))
    n = sum(p.numel() for p in network.parameters())
    assert est["lora_parameters"] == n
    parts = est["parts"]
    assert parts["lora"] == parts["gradients"] == 4 * n and parts["optimizer"] == 8 * n
    assert parts["weights"] == sum(p.numel() * p.element_size() for p in host.model.parameters())
    assert est["total"] == sum(parts.values())          # no CUDA margin on the CPU
    assert memory.estimate(host, _cfg(optimizer_type="AdamW8bit"))["parts"]["optimizer"] == 2 * n
    gc = memory.estimate(host, _cfg(gradient_checkpointing=True))["parts"]["activations"]
    assert gc < parts["activations"] / 2
    four = memory.estimate(host, _cfg(train_batch_size=4))["parts"]["activations"]
    assert 1.8 < four / parts["activations"] < 2.2
    bigger = memory.estimate(host, _cfg(resolution="256"))["parts"]["activations"]
    assert 3.5 < bigger / parts["activations"] < 4.5     # fused attention: linear in the number of pixels
    with_te = memory.estimate(host, _cfg(text_encoder_lr=None))
    assert with_te["parts"]["activations"] > parts["activations"]
    assert with_te["lora_parameters"] > n
    text = memory.describe(est)
    assert text.startswith(f"about **{est['total'] / 2**20:.0f} MB** on cpu") and "activations in float32" in text


def test_estimating_leaves_the_model_as_it_was():
    host = WebuiHost(tiny_model("sd1"))
    before = {k: v.clone() for k, v in host.model.state_dict().items()}
    flags = [(p.requires_grad, p.device, p.dtype) for p in host.model.parameters()]
    forwards = [m.__dict__.get("forward") for m in host.model.modules()]
    memory.estimate(host, _cfg(gradient_checkpointing=True, text_encoder_lr=None))
    after = host.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [(p.requires_grad, p.device, p.dtype) for p in host.model.parameters()]
    assert forwards == [m.__dict__.get("forward") for m in host.model.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in host.model.modules())


def test_checkpointing_keeps_the_blocks_cheapest_to_keep_within_its_margin():
    """Blocks are kept (not recomputed) smallest activations first while the run's memory stays within
    (1 + margin) x that of recomputing every block; margin 0 recomputes all, a wide one none."""
    blocks = [{"inputs": 10, "saved": s} for s in (400, 100, 50, 300)]
    measured = {"total": 200 + 850, "largest_tensor": 20, "blocks": blocks}
    every = memory._kept(measured, [True] * 4)
    assert every == 200 + 40 + 400 + 40
    assert memory.recomputed_blocks(measured, 0.0, 1000) == [True] * 4
    plan = memory.recomputed_blocks(measured, 0.1, 1000)
    assert plan == [True, False, False, True]       # 50 and 100 kept: 1810 of 1848 allowed; 300 would pass it
    assert 1000 + memory._kept(measured, plan) <= 1.1 * (1000 + every)
    assert memory.recomputed_blocks(measured, 10, 1000) == [False] * 4
    assert memory._kept(measured, [False] * 4) == memory._kept(measured, None) == 1050 + 40


def test_the_estimate_counts_the_blocks_the_run_recomputes():
    host = WebuiHost(tiny_model("sd1"))
    n = len(host.checkpoint_blocks())
    all_of = memory.estimate(host, _cfg(gradient_checkpointing=True, checkpointing_margin=0))
    assert all_of["recomputed"] == [True] * n and all_of["parts"]["activations"] == all_of["all_recomputed"]
    none = memory.estimate(host, _cfg(gradient_checkpointing=True, checkpointing_margin=10))
    assert none["recomputed"] == [False] * n
    assert none["parts"]["activations"] == memory.estimate(host, _cfg())["parts"]["activations"]
    some = memory.estimate(host, _cfg(gradient_checkpointing=True, checkpointing_margin=0.05))
    full_total = all_of["total"]
    assert some["total"] <= 1.05 * full_total and some["total"] >= full_total
