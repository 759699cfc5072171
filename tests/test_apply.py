"""The on-the-fly engine on the tiny webui-layout models."""
import copy
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import builtin_lora_double as builtin
from conftest import tiny_model
from lora_ext import files, naming
from lora_ext.apply import Engine, Request
from random_networks import make_random_lora
from lora_ext.hosts.webui import WebuiHost
from lora_ext import tiny


def _lora_file(path, model, kind="lora", seed=0, every=1):
    """A kohya-format file for `model`: lora (attention layers), locon (+ convs), loha or lokr (plain math)."""
    arch = naming.arch_from_model(model)
    if kind in ("lora", "locon"):
        modules = make_random_lora(model, rank=4, alpha=2.0, conv_rank=2 if kind == "locon" else None, seed=seed)
        modules = dict(list(modules.items())[::every])
        files.write_kohya(str(path), files.kohya_tensors(modules), {}, overwrite=True)
        return str(path)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for t in naming.targets(arch)[::every]:
        if t.locon or t.qkv is not None:
            continue
        out_f, in_f = model.get_submodule(t.webui).weight.shape[:2]
        if kind == "loha":
            parts = {"hada_w1_a": (out_f, 2), "hada_w1_b": (2, in_f), "hada_w2_a": (out_f, 2), "hada_w2_b": (2, in_f)}
        else:
            parts = {"lokr_w1": (2, 2), "lokr_w2_a": (out_f // 2, 2), "lokr_w2_b": (2, in_f // 2)}
        for part, shape in parts.items():
            tensors[f"{t.kohya}.{part}"] = torch.randn(shape, generator=g) * 0.1
        tensors[f"{t.kohya}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return str(path)


def _plain_delta(parts, shape):
    """The weight change a file's module describes, written out with plain math (not lora_ext's)."""
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    if "lora_down.weight" in parts:
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        rank = down.shape[0]
        d = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1))
    elif "hada_w1_a" in parts:
        rank = parts["hada_w1_b"].shape[0]
        d = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
    else:
        rank = parts["lokr_w2_b"].shape[0]
        w1, w2 = parts["lokr_w1"], parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        d = torch.cat([torch.cat([w1[i, j] * w2 for j in range(w1.shape[1])], 1) for i in range(w1.shape[0])], 0)
    scale = (alpha if alpha is not None else rank) / rank
    return (d * scale).reshape(shape)


def _reference(model, path, w_unet, w_te):
    """A copy of `model` with the file's deltas added by hand."""
    return _reference_many(model, [(path, w_unet, w_te)])


def _reference_many(model, requests):
    ref = copy.deepcopy(model)
    index = naming.NameIndex(naming.arch_from_model(model))
    for path, w_unet, w_te in requests:
        _add_by_hand(ref, index, path, w_unet, w_te)
    return ref


def _add_by_hand(ref, index, path, w_unet, w_te):
    grouped = {}
    for key, t in load_file(path).items():
        name, _, part = key.partition(".")
        grouped.setdefault(name, {})[part] = t
    with torch.no_grad():
        for name, parts in grouped.items():
            t = index.find(name)
            layer = ref.get_submodule(t.webui)
            w = w_unet if t.is_unet else w_te
            if t.qkv is not None:
                block = layer.in_proj_weight.view(3, -1, layer.in_proj_weight.shape[1])[t.qkv]
                block += w * _plain_delta(parts, block.shape)
            else:
                layer.weight += w * _plain_delta(parts, layer.weight.shape)


def _outputs(model):
    """UNet output and text-encoder output(s) on fixed inputs."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(1, 4, 8, 8, generator=g)
    width = sum(w for _, w, _ in model.spec.te)
    ctx = torch.randn(1, 77, width, generator=g)
    ids = torch.randint(0, 49407, (1, 77), generator=g)
    with torch.no_grad():
        unet = model.model.diffusion_model
        y = torch.randn(1, unet.label_emb[0][0].in_features, generator=g) if model.is_sdxl else None
        outs = [unet(x, torch.tensor([500]), context=ctx, y=y)]
        holders = ([e.wrapped for e in model.conditioner.embedders] if model.is_sdxl else [model.cond_stage_model.wrapped])
        for h in holders:
            outs.append(h.transformer(ids).last_hidden_state if hasattr(h, "transformer") else h.model.encode_text(ids))
    return outs


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_bit_exact(model, snap):
    bad = [k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


CASES = [("sd1", "lora"), ("sd1", "locon"), ("sd1", "loha"), ("sd1", "lokr"), ("sd2", "lora"), ("sd2", "locon"),
         ("sdxl", "lora"), ("sdxl", "locon")]


@pytest.mark.parametrize("arch,kind", CASES)
def test_outputs_equal_an_independent_reference(tmp_path, arch, kind):
    model = tiny_model(arch)
    snap = _snapshot(model)
    path = _lora_file(tmp_path / "x.safetensors", model, kind, seed=3)
    ref = _reference(model, path, 0.7, -0.4)
    engine = Engine()
    host = WebuiHost(model)
    report = engine.apply(host, [Request(path, 0.7, -0.4, "x")])
    assert report.warnings == [] and report.applied[0]["modules"] > 0
    try:
        for ours, theirs in zip(_outputs(model), _outputs(ref)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        plain = _outputs_of(snap, model)
        assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(_outputs(model), plain))   # it did change them
    finally:
        engine.restore(host)
    _assert_bit_exact(model, snap)


def _outputs_of(snap, model):
    return _outputs(_with_weights(model, snap))


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_bypass_mode_matches_merged_outputs(tmp_path, arch):
    model = tiny_model(arch)
    snap = _snapshot(model)
    path = _lora_file(tmp_path / "x.safetensors", model, "locon", seed=4)
    engine, host = Engine(), WebuiHost(model)
    engine.apply(host, [Request(path, 0.8, 0.5)])
    merged = _outputs(model)
    report = engine.apply(host, [Request(path, 0.8, 0.5)], mode="bypass")
    assert report.applied[0]["mode"] == "bypass"
    if arch == "sd1":
        _assert_bit_exact(model, snap)          # nothing merged: every layer is hooked
    else:
        assert "cannot be hooked" in report.warnings[0]
    for a, b in zip(_outputs(model), merged):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    engine.restore(host)
    _assert_bit_exact(model, snap)
    assert all(not m._forward_hooks for m in model.modules())


def test_changes_redo_only_what_they_must(tmp_path):
    model = tiny_model("sd1")
    snap = _snapshot(model)
    a = _lora_file(tmp_path / "a.safetensors", model, "lora", seed=1)
    b = _lora_file(tmp_path / "b.safetensors", model, "lora", seed=2, every=3)
    engine, host = Engine(), WebuiHost(model)
    n_a = engine.apply(host, [Request(a, 1.0, 1.0)]).written
    te_params = sum(1 for n in files.read(a).modules if n.startswith("lora_te"))
    assert engine.apply(host, [Request(a, 1.0, 1.0)]).written == 0                 # nothing changed
    assert engine.apply(host, [Request(a, 1.0, 0.5)]).written == te_params         # only the text encoder
    r = engine.apply(host, [Request(a, 1.0, 0.5), Request(b, 1.0, 1.0)])
    assert r.written == len(files.read(b).modules) and r.restored == 0               # only b's layers
    r = engine.apply(host, [Request(a, 1.0, 0.5)])
    assert r.written == len(files.read(b).modules)                                   # b's layers back to a only
    assert engine.cache.reads == 2                                                   # nothing re-read
    os.utime(a, ns=(os.stat(a).st_atime_ns, os.stat(a).st_mtime_ns + 10 ** 9))
    assert engine.apply(host, [Request(a, 1.0, 0.5)]).written == n_a                 # changed on disk: re-read
    assert engine.cache.reads == 3
    assert engine.restore(host).restored == n_a
    _assert_bit_exact(model, snap)


@pytest.mark.parametrize("order", ["ours_first", "builtin_first"])
@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_stacking_with_the_builtin_lora(tmp_path, arch, order):
    model = copy.deepcopy(tiny_model(arch))
    snap = _snapshot(model)
    handles = builtin.install(model)
    ours = _lora_file(tmp_path / "x.safetensors", model, "lora", seed=5)
    theirs = builtin.random_net(model, "theirs", seed=6)
    theirs.te_multiplier, theirs.unet_multiplier = 0.6, 0.9
    engine, host = Engine(), WebuiHost(model)
    steps = [lambda: engine.apply(host, [Request(ours, 0.8, 0.3)]),
             lambda: (builtin.loaded_networks.__setitem__(slice(None), [theirs]), builtin.touch_all(model))]
    for step in (steps if order == "ours_first" else steps[::-1]):
        step()
    builtin.touch_all(model)            # a generation
    ref = _reference(_with_weights(model, snap), ours, 0.8, 0.3)
    ref_params = dict(ref.named_parameters())
    their_delta = {(id(layer), p): d for (layer, p), d in builtin.expected_delta(model, theirs).items()}
    for name, param in model.named_parameters():
        owner_path, _, pname = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        want = ref_params[name] + their_delta.get((id(owner), pname), 0)
        torch.testing.assert_close(param, want, rtol=1e-5, atol=1e-6, msg=name)
    # change ours while theirs stays, then theirs off, then ours off
    engine.apply(host, [Request(ours, 0.2, 0.3)])
    builtin.touch_all(model)
    builtin.loaded_networks.clear()
    builtin.touch_all(model)
    ref = _reference(_with_weights(model, snap), ours, 0.2, 0.3)
    for (name, param), want in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(param, want, rtol=1e-5, atol=1e-6, msg=name)
    engine.restore(host)
    builtin.touch_all(model)
    _assert_bit_exact(model, snap)
    for h in handles:
        h.remove()


def _with_weights(model, snap):
    plain = copy.deepcopy(model)
    for m in plain.modules():       # the copies of the double's hooks still point at the original layers
        m._forward_pre_hooks.clear()
        m._load_state_dict_pre_hooks.clear()
        m._forward_hooks.clear()
    plain.load_state_dict(snap)
    return plain


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(tmp_path, dtype):
    model = copy.deepcopy(tiny_model("sd1")).to(dtype)
    snap = _snapshot(model)
    path = _lora_file(tmp_path / "x.safetensors", model.float(), "locon", seed=7)
    model.to(dtype)
    engine, host = Engine(), WebuiHost(model)
    engine.apply(host, [Request(path, 0.9, 0.9)])
    ref = _reference(_with_weights(model, snap).float(), path, 0.9, 0.9)
    ulp = torch.finfo(dtype).eps
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        # delta computed in fp32 and added to the fp32 value of the weight, then cast once: within one unit
        # in the last place of the fp32 reference cast (the order of fp32 operations may round differently)
        assert p.dtype == dtype
        torch.testing.assert_close(p.float(), r.to(dtype).float(), rtol=ulp, atol=ulp * 1e-3, msg=name)
    engine.restore(host)
    _assert_bit_exact(model, snap)


def test_medvram_style_moves_between_applies(tmp_path):
    model = copy.deepcopy(tiny_model("sd1"))
    snap = _snapshot(model)
    path = _lora_file(tmp_path / "x.safetensors", model, "locon", seed=8)
    engine, host = Engine(), WebuiHost(model)
    engine.apply(host, [Request(path, 1.0, 1.0)])
    # a module sent to another device and back gets new storage under the same Parameter objects
    model.model.diffusion_model._apply(lambda t: t.clone())
    engine.apply(host, [Request(path, 0.5, 1.0)])
    ref = _reference(_with_weights(model, snap), path, 0.5, 1.0)
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=name)
    model.model.diffusion_model._apply(lambda t: t.clone())
    engine.restore(host)
    _assert_bit_exact(model, snap)


def test_wrong_architecture_or_missing_file_is_a_warning(tmp_path):
    model = tiny_model("sd1")
    snap = _snapshot(model)
    xl = _lora_file(tmp_path / "xl.safetensors", tiny_model("sdxl"), "lora")
    engine, host = Engine(), WebuiHost(model)
    report = engine.apply(host, [Request(xl, 1, 1, "xl"), Request(str(tmp_path / "gone.safetensors"), 1, 1, "gone")])
    assert report.applied == [] and len(report.warnings) == 2
    assert "xl: skipped: it is a LoRA for SDXL, the model is SD1" in report.warnings[0]
    assert "gone: skipped: no such file" in report.warnings[1]
    _assert_bit_exact(model, snap)


def test_a_lora_of_other_layer_sizes_is_skipped(tmp_path):
    model = tiny_model("sd1")
    snap = _snapshot(model)
    wide = tiny.TinySD(tiny.TinySpec("sd1", model_channels=64))
    path = _lora_file(tmp_path / "w.safetensors", wide, "lora")
    report = Engine().apply(WebuiHost(model), [Request(path, 1, 1, "wide")])
    assert report.applied == [] and "other sizes than the model's" in report.warnings[0]
    _assert_bit_exact(model, snap)


def test_cache_is_bounded(tmp_path):
    model = tiny_model("sd1")
    paths = [_lora_file(tmp_path / f"{i}.safetensors", model, "lora", seed=i) for i in range(3)]
    engine, host = Engine(), WebuiHost(model)
    one = sum(t.numel() * 4 for m in files.read(paths[0]).modules.values() for t in m.parts.values())
    engine.cache.max_bytes = int(one * 1.5)
    for p in paths:
        engine.apply(host, [Request(p)])
    assert len(engine.cache._items) == 1
    engine.restore(host)


def test_500_random_cycles_leave_weights_bit_exact(tmp_path):
    """apply / change / remove / switch model / interrupted generation / medvram moves / built-in on and off /
    checkpoint reload, at random; weights checked against the expected values along the way and bit-exact
    at the end."""
    rng = random.Random(0)
    models = [copy.deepcopy(tiny_model("sd1")), tiny.build("sd1", seed=1)]
    snaps = [_snapshot(m) for m in models]
    handles = [builtin.install(m) for m in models]
    paths = [_lora_file(tmp_path / f"{k}.safetensors", models[0], k, seed=i, every=4)
             for i, k in enumerate(["lora", "locon", "loha"])]
    engine = Engine()
    hosts = [WebuiHost(m) for m in models]
    current = 0
    wanted = [[], []]
    theirs = builtin.random_net(models[0], "b", seed=9)
    builtin.loaded_networks.clear()
    checked = 0
    for cycle in range(500):
        op = rng.choice(["apply", "apply", "weight", "remove", "switch", "interrupt", "move", "builtin", "reload"])
        m, host = models[current], hosts[current]
        if op == "apply":
            wanted[current] = [Request(p, rng.choice([0, 0.5, 1.0, -0.7]), rng.choice([0, 1.0, 0.3]))
                               for p in rng.sample(paths, rng.randint(1, 3))]
        elif op == "weight" and wanted[current]:
            i = rng.randrange(len(wanted[current]))
            r = wanted[current][i]
            wanted[current][i] = Request(r.path, rng.choice([0.25, 0.75, 1.5]), r.te)
        elif op == "remove" and wanted[current]:
            wanted[current].pop(rng.randrange(len(wanted[current])))
        elif op == "switch":
            current = 1 - current
            m, host = models[current], hosts[current]
        elif op == "move":
            m.model.diffusion_model.input_blocks._apply(lambda t: t.clone())
        elif op == "builtin":
            builtin.loaded_networks[:] = [] if builtin.loaded_networks else [theirs]
        elif op == "reload":
            # the webui loads a checkpoint into the model: weights replaced, then on_model_loaded
            m.load_state_dict(snaps[current])
            engine.forget(m)
        mode = "bypass" if rng.random() < 0.2 else "merge"
        engine.apply(host, wanted[current], mode=mode)
        if op == "interrupt":
            def boom(*_):
                raise KeyboardInterrupt
            h = m.model.diffusion_model.middle_block.register_forward_hook(boom)
            with pytest.raises(KeyboardInterrupt):
                _outputs(m)
            h.remove()
        else:
            builtin.touch_all(m)
        if mode == "merge" and not builtin.loaded_networks and cycle % 10 == 0:
            ref = _reference_many(_with_weights(m, snaps[current]), [(r.path, r.unet, r.te) for r in wanted[current]])
            for (name, p), r in zip(m.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=f"cycle {cycle}: {name}")
            checked += 1
    assert checked > 10
    for i, m in enumerate(models):
        engine.restore(hosts[i])
        builtin.loaded_networks.clear()
        builtin.touch_all(m)
        _assert_bit_exact(m, snaps[i])
        assert all(not mod._forward_hooks for mod in m.modules())
        for h in handles[i]:
            h.remove()


def test_checkpoint_weights_hides_the_builtins_deltas_and_puts_them_back(any_arch):
    """Training after a `<lora:x>` generation: the built-in leaves x's deltas in the weights until its next
    use. Inside checkpoint_weights the model holds the checkpoint's weights; after it, what it left."""
    from lora_ext.hosts.builtin_lora import checkpoint_weights

    model = copy.deepcopy(tiny_model(any_arch))
    snap = _snapshot(model)
    handles = builtin.install(model)
    builtin.loaded_networks[:] = [builtin.random_net(model, "theirs", seed=3)]
    builtin.touch_all(model)            # a generation with <lora:theirs>
    left = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(left[k], snap[k]) for k in snap)
    with checkpoint_weights(model) as layers:
        assert layers > 0
        _assert_bit_exact(model, snap)
    for k, v in model.state_dict().items():
        assert torch.equal(v, left[k]), k
    builtin.loaded_networks.clear()
    builtin.touch_all(model)            # the built-in's next generation gives its weights back
    _assert_bit_exact(model, snap)
    for h in handles:
        h.remove()


def test_text_encoder_edits_count_every_change_to_the_text_encoder(tmp_path):
    """The webui reuses a prompt's conditioning unless its key changes, and our LoRAs are not in that key:
    the engine counts each change to what the text encoder computes (apply, weight change, restore, forget),
    and only those (the script clears the webui's cache when the count moved)."""
    model = copy.deepcopy(tiny_model("sd1"))
    path = _lora_file(tmp_path / "x.safetensors", model)
    engine, host = Engine(), WebuiHost(model)
    counts = [engine.text_encoder_edits]

    def step(requests):
        engine.apply(host, requests)
        counts.append(engine.text_encoder_edits)

    step([Request(path, 1.0, 0.5)])     # TE on
    step([Request(path, 0.3, 0.5)])     # UNet only changed
    step([Request(path, 0.3, 0.7)])     # TE weight changed
    step([Request(path, 0.3, 0.0)])     # TE off
    step([Request(path, 0.8, 0.0)])     # UNet only
    step([Request(path, 0.8, 0.2)])     # TE on again
    step([])                            # restore
    assert [b - a for a, b in zip(counts, counts[1:])] == [1, 0, 1, 1, 0, 1, 1]
    before = engine.text_encoder_edits
    engine.forget(model)                # a checkpoint was loaded into the model
    assert engine.text_encoder_edits == before + 1
