"""Training every network type we train (LoRA/LoCon, LoHa, LoKr, each with DoRA), from the command lines
kohya + LyCORIS users write (`--network_module lycoris.kohya --network_args algo=...`), on the real engine."""
import copy
import json

import pytest
import torch

from conftest import tiny_model
from lora_ext import files
from lora_ext.networks import kinds
from lora_ext.apply import Engine, Request
from lora_ext.hosts.webui import WebuiHost
from lora_ext.train import memory, network_args
from lora_ext.train.config import ConfigError
from lora_ext.train.loop import train
from lora_ext.train.network import network_for
from lora_ext.train.network_args import spec
from test_train import _assert_same, _cfg, _model_state, data, loss_falls  # noqa: F401  (data: a fixture)

LYCO = "lycoris.kohya"
RUNS = {
    # id: (network_module, network_args, what the file reads as, the file's parts)
    "loha": (LYCO, ["algo=loha", "conv_dim=2", "conv_alpha=1"], "loha", {"hada_w1_a", "hada_w2_b"}),
    "loha_tucker_dropouts": (LYCO, ["algo=loha", "use_tucker=True", "rank_dropout=0.2", "module_dropout=0.2"],
                             "loha", {"hada_t1", "hada_t2"}),
    "lokr": (LYCO, ["algo=lokr", "factor=4"], "lokr", {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "lokr_full": (LYCO, ["algo=lokr", "full_matrix=True", "conv_dim=2"], "lokr", {"lokr_w1", "lokr_w2"}),
    "dora": (LYCO, ["algo=locon", "dora_wd=True", "conv_dim=2"], "locon+dora", {"lora_down.weight", "dora_scale"}),
    "loha_dora": (LYCO, ["algo=loha", "dora_wd=True"], "loha+dora", {"hada_w1_a", "dora_scale"}),
    "lycoris_lora": (LYCO, ["algo=lora"], "locon", {"lora_up.weight"}),    # LyCORIS: convs at network_dim
    "kohya_lora": ("networks.lora", [], "lora", {"lora_up.weight"}),        # kohya: no convs without conv_dim
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_each_type_trains_saves_what_it_is_and_gives_the_model_back(data, tmp_path, run):
    module, args, network, parts = RUNS[run]
    model = tiny_model("sd1")
    before = _model_state(model)
    cfg = _cfg(data, tmp_path, network_module=module, network_args=args, max_train_steps=3, learning_rate=1e-2)
    result = train(WebuiHost(model), cfg)
    _assert_same(model, before)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    lora = files.read(result.lora_path, WebuiHost(model).arch)
    assert lora.network == network
    assert parts <= set().union(*(m.parts for m in lora.modules.values()))
    assert lora.metadata["ss_network_module"] == module
    if module == LYCO:
        meta_args = json.loads(lora.metadata["ss_network_args"])
        assert meta_args["algo"] == args[0].split("=")[1] and meta_args["conv_dim"]
    # it learned: the file changes the model, and applying it gives the model back bit-exact
    engine, host = Engine(), WebuiHost(model)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    report = engine.apply(host, [Request(result.lora_path)])
    assert report.warnings == [] and report.applied[0]["modules"] == len(lora.modules)
    assert any(not torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    engine.restore(host)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("run", ["loha", "lokr", "dora"])
def test_the_saved_file_holds_the_change_the_run_trained(data, tmp_path, run):
    """What the trained network added to each layer is what the file, read back, adds (fp32 save)."""
    module, args, _, _ = RUNS[run]
    model = tiny_model("sd1")
    host = WebuiHost(model)
    cfg = _cfg(data, tmp_path, network_module=module, network_args=args, max_train_steps=2, learning_rate=1e-2)
    result = train(host, cfg)
    lora = files.read(result.lora_path, host.arch)
    net = network_for(host, spec(cfg))
    assert net.load_stored(lora.modules) == []        # every module fits a fresh network of the same options
    net.eval()
    for name, m in net.loras.items():
        base = net.bound[name].param.detach()
        torch.testing.assert_close(lora.modules[name].delta(base.shape, base),
                                   m.weight_delta(base).detach(), rtol=1e-5, atol=1e-6)


def test_a_network_of_another_type_is_named_not_half_loaded(data, tmp_path):
    model = tiny_model("sd1")
    host = WebuiHost(model)
    loha = train(host, _cfg(data, tmp_path / "a", network_module=LYCO, network_args=["algo=loha"], max_train_steps=1))
    lokr_cfg = _cfg(data, tmp_path / "b", network_module=LYCO, network_args=["algo=lokr"], max_train_steps=1,
                    network_weights=loha.lora_path)
    messages = []
    train(host, lokr_cfg, on_event=lambda e: messages.append(e.text) if e.kind == "message" else None)
    assert any("network_weights:" in m and "start from zero" in m for m in messages), messages


def test_loha_lowers_the_loss_on_fixed_noise(data, tmp_path):
    host = WebuiHost(copy.deepcopy(tiny_model("sd1")))

    def lora_of():
        return train(host, _cfg(data, tmp_path, max_train_steps=40, learning_rate=5e-3, network_dim=8, network_alpha=8,
                                network_module=LYCO, network_args=["algo=loha", "conv_dim=4"],
                                cache_latents=True)).lora_path
    before, after = loss_falls(host, data["train"], lora_of)
    assert after < 0.85 * before, (before, after)


def test_sdxl_open_clip_attention_trains_with_loha_and_dora(data, tmp_path):
    """open_clip's q/k/v rows and out_proj (an nn.MultiheadAttention computes with them directly) take the
    weight-form types through the parametrization, DoRA's norms over each row block."""
    model = tiny_model("sdxl")
    host = WebuiHost(model)
    before = _model_state(model)
    result = train(host, _cfg(data, tmp_path, network_module=LYCO, network_args=["algo=loha", "dora_wd=True"],
                              max_train_steps=2, learning_rate=1e-2))
    _assert_same(model, before)
    lora = files.read(result.lora_path, host.arch)
    te2 = [n for n in lora.modules if n.startswith("lora_te2_")]
    assert lora.network == "loha+dora" and any("self_attn_q_proj" in n for n in te2)
    engine = Engine()
    report = engine.apply(host, [Request(result.lora_path)])
    assert report.warnings == [] and report.applied[0]["modules"] == len(lora.modules)
    engine.restore(host)
    _assert_same(model, before)


def test_memory_estimate_knows_each_type(data, tmp_path):
    host = WebuiHost(tiny_model("sd1"))
    est = {}
    for run in ("kohya_lora", "loha", "lokr_full", "dora"):
        module, args, _, _ = RUNS[run]
        cfg = _cfg(data, tmp_path, network_module=module, network_args=args)
        est[run] = memory.estimate(host, cfg)
        assert est[run]["lora_parameters"] == sum(p.numel() for p in network_for(host, spec(cfg)).parameters())
    # the weight-form types keep their layers' whole changed weights for the backward pass; LoRA keeps its
    # small rank activations only
    lora_kept = est["kohya_lora"]["parts"]["activations"]
    weights = sum(b.param.numel() * 4 for b in host.lora_targets().values())
    for r in ("loha", "lokr_full", "dora"):
        assert est[r]["parts"]["activations"] - lora_kept > 0.5 * weights, r


@pytest.mark.parametrize("args,message", [
    (["algo=loha", "network_dropout_is_not_an_arg=1"], "not supported: network_dropout_is_not_an_arg"),
    (["algo=full"], r"full \(diff\) is not trained"),
    (["algo=loha", "preset=attn-only"], "preset=attn-only"),
])
def test_lycoris_options_we_do_not_train_are_refused_by_name(data, tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(data, tmp_path, network_module=LYCO, network_args=args).validate()


def test_lycoris_defaults_are_lycoris_and_kohyas_are_kohyas(data, tmp_path):
    lyco = network_args.spec(_cfg(data, tmp_path, network_module=LYCO, network_args=["algo=loha"], network_alpha=3))
    assert (lyco.algo, lyco.conv_dim, lyco.conv_alpha, lyco.title) == ("loha", 4, 3, "LoHa")
    kohya = network_args.spec(_cfg(data, tmp_path, network_args=["conv_dim=8"]))
    assert (kohya.algo, kohya.conv_dim, kohya.conv_alpha, kohya.title) == ("lora", 8, 1.0, "LoCon")
    dora = network_args.spec(_cfg(data, tmp_path, network_module=LYCO, network_args=["algo=lokr", "dora_wd=yes"],
                                  network_dropout=0.1))
    assert dora.title == "LoKr + DoRA" and dora.options.dora and not dora.options.dora_on_output
    assert any("network_dropout has no effect on LoKr" in n for n in dora.notes)


def test_a_lokr_with_full_factors_is_described_not_crashed_on(data, tmp_path):
    """Its modules have no rank (both Kronecker factors full): inspect, the block table and the panel's info
    line say 'full' (min() of None and numbers, and 'None:g', were what they met before)."""
    import os
    import shutil

    from lora_ext.tools import describe
    from lora_ext.library import LoraLibrary
    from lora_ext.panel.runtime import PanelRuntime

    module, args, _, _ = RUNS["lokr_full"]
    result = train(WebuiHost(tiny_model("sd1")), _cfg(data, tmp_path, network_module=module, network_args=args,
                                                      max_train_steps=1))
    report = describe.describe_lora(files.read(result.lora_path))
    assert report["network"] == "lokr" and report["rank"] == "full"
    assert all(row[2] == "full" for row in describe.block_rows(files.read(result.lora_path)))
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(result.lora_path, folder / "full.safetensors")
    line = PanelRuntime(LoraLibrary(lambda: [str(folder)])).info_line("full.safetensors")
    assert "SD1 · lokr · rank full · conv rank full" in line, line
    assert os.path.exists(result.lora_path)


def test_a_kohya_lycoris_command_line_trains_as_written(data, tmp_path):
    """The command line a kohya + LyCORIS guide gives (`--network_module lycoris.kohya --network_args ...`)."""
    import os

    from lora_ext import tiny
    from test_train import _cli

    tiny.save_checkpoint(tiny_model("sd1"), str(tmp_path / "tiny.safetensors"))
    out = _cli("train", "--pretrained_model_name_or_path", "tiny.safetensors", "--train_data_dir", data["train"],
               "--resolution", "64", "--max_train_steps", "2", "--network_dim", "4", "--network_alpha", "1",
               "--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "factor=4", "conv_dim=2",
               "dora_wd=True", "--network_dropout", "0.1", "--output_dir", "o", "--output_name", "k",
               "--mixed_precision", "no", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "network_dropout has no effect on LoKr" in out.stdout + out.stderr
    lora = files.read(str(tmp_path / "o" / "k.safetensors"))
    assert lora.network == "lokr+dora" and lora.metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(lora.metadata["ss_network_args"]) == {"algo": "lokr", "factor": "4", "conv_dim": "2",
                                                             "dora_wd": "True", "conv_alpha": "1"}
    assert os.path.getsize(str(tmp_path / "o" / "k.safetensors")) > 0


@pytest.mark.parametrize("kind", [t.name for t in kinds.trained()])
def test_every_type_the_registry_trains_trains_applies_and_merges(data, tmp_path, kind):
    """Over the type registry (networks/kinds), no list elsewhere: each type that has a trained module trains
    by its first LyCORIS algo name, saves a file that reads back as that type, applies (and gives the model
    back bit-exact) and merges into a checkpoint with the change the engine applies."""
    from safetensors.torch import load_file

    from lora_ext.merge import Item, merge_checkpoint
    from lora_ext import tiny

    t = kinds.BY_NAME[kind]
    model = tiny_model("sd1")
    result = train(WebuiHost(model), _cfg(data, tmp_path, network_module=LYCO, network_args=[f"algo={t.algos[0]}"],
                                          max_train_steps=2, learning_rate=1e-2))
    lora = files.read(result.lora_path, WebuiHost(model).arch)
    assert {m.network for m in lora.modules.values()} == {kind}
    engine, host = Engine(), WebuiHost(model)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    engine.apply(host, [Request(result.lora_path, 0.7, 0.7)])
    applied = {k: v.clone() for k, v in model.checkpoint_state_dict().items()}
    engine.restore(host)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    base = str(tmp_path / "base.safetensors")
    tiny.save_checkpoint(model, base)
    merge_checkpoint(base, [Item(result.lora_path, 0.7, 0.7)], str(tmp_path / "merged.safetensors"), "fp32")
    merged, plain = load_file(str(tmp_path / "merged.safetensors")), load_file(base)
    assert any(not torch.equal(merged[k], plain[k]) for k in plain)           # the file changed the model
    for key, value in applied.items():
        if key in merged:
            torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
