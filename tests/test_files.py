"""Reading and writing LoRA files: every reader round-trips against deltas computed here with plain math,
inspect reads a file made by an independent writer, and malformed files fail with one clear error."""
import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import ROOT, tiny_model
from lora_ext import files, formats, naming
from lora_ext.files import LoraFileError


def _arch(name):
    return naming.arch_from_model(tiny_model(name))


def _diffusers_unet(arch_name):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from lora_ext import tiny

    model = tiny_model(arch_name)
    config = create_unet_diffusers_config_from_ldm(tiny.ldm_config(model.spec), model.checkpoint_state_dict())
    return UNet2DConditionModel(**config)


def independent_kohya_lora(path, rank=4, alpha=2.0, seed=1):
    """kohya's recipe, written here without lora_ext: walk diffusers' UNet and transformers' CLIP text model
    of the tiny SD1 config, take the Linear/Conv2d children of Transformer2DModel / CLIPAttention / CLIPMLP,
    name them lora_unet_/lora_te_ + path with '_', and save down/up/alpha with kohya's metadata."""
    from transformers import CLIPTextConfig, CLIPTextModel

    g = torch.Generator().manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2))
    tensors = {}
    for prefix, root, classes in (("lora_unet", _diffusers_unet("sd1"), ("Transformer2DModel",)),
                                  ("lora_te", te, ("CLIPAttention", "CLIPMLP"))):
        for name, module in root.named_modules():
            if type(module).__name__ not in classes:
                continue
            for child, layer in module.named_modules():
                if isinstance(layer, nn.Linear):
                    down, up = (rank, layer.in_features), (layer.out_features, rank)
                elif isinstance(layer, nn.Conv2d):
                    down, up = (rank, layer.in_channels, 1, 1), (layer.out_channels, rank, 1, 1)
                else:
                    continue
                key = f"{prefix}.{name}.{child}".replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = torch.randn(down, generator=g).half()
                tensors[f"{key}.lora_up.weight"] = torch.randn(up, generator=g).half()
                tensors[f"{key}.alpha"] = torch.tensor(alpha).half()
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_v2": "False", "ss_base_model_version": "sd_v1", "ss_resolution": "(512, 512)",
            "ss_tag_frequency": json.dumps({"1_cat": {"cat": 3}})}
    save_file(tensors, str(path), meta)
    return tensors


def test_inspect_reads_an_independent_kohya_lora(tmp_path):
    path = tmp_path / "indep.safetensors"
    tensors = independent_kohya_lora(path)
    n_modules = sum(1 for k in tensors if k.endswith(".alpha"))
    n_te = sum(1 for k in tensors if k.startswith("lora_te") and k.endswith(".alpha"))
    out = subprocess.run([sys.executable, "-m", "lora_ext", "inspect", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    assert report["format"] == "kohya" and report["arch"] == "sd1" and report["network"] == "lora"
    assert report["rank"] == 4 and report["alpha"] == 2.0
    assert report["modules"] == {"unet": n_modules - n_te, "te": n_te} and n_te == 12
    assert report["sha256"] == hashlib.sha256(data).hexdigest()
    assert report["addnet_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest()
    assert report["metadata"]["ss_tag_frequency"] == {"1_cat": {"cat": 3}}
    assert report["unmatched"] == []


# --- round trips: each reader against deltas computed here -------------------------------------------

def _lora_parts(out_f, in_f, rank, g, conv_kernel=None):
    if conv_kernel:
        return torch.randn(rank, in_f, *conv_kernel, generator=g), torch.randn(out_f, rank, 1, 1, generator=g)
    return torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)


def _plain_delta(down, up, alpha, rank):
    d = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return (d * alpha / rank).reshape(up.shape[0], *down.shape[1:])


def _layer(model, target):
    layer = model.get_submodule(target.webui)
    if target.qkv is not None:
        return layer.in_proj_weight.chunk(3, 0)[target.qkv]
    return layer.weight


def _pick(arch_name, n=6, locon=False):
    ts = naming.targets(_arch(arch_name))
    te = [t for t in ts if not t.is_unet][:2]
    unet = [t for t in ts if t.is_unet and t.locon == locon]
    return te + unet[:: max(1, len(unet) // n)][:n]


def _expected(model, targets, style, rank=3, alpha=1.5, seed=0):
    """(file tensors in `style`, {kohya name: expected delta})."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for t in targets:
        w = _layer(model, t)
        kernel = tuple(w.shape[2:]) if w.ndim == 4 else None
        down, up = _lora_parts(w.shape[0], w.shape[1], rank, g, kernel)
        a = alpha if style in ("kohya", "kohya_sgm", "peft_alpha") else rank
        expected[t.kohya] = _plain_delta(down, up, a, rank)
        if style == "kohya":
            key = t.kohya
        elif style == "kohya_sgm":
            key = t.alias
        if style in ("kohya", "kohya_sgm"):
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(a)})
        elif style in ("peft", "peft_alpha"):
            tensors.update({f"{t.diffusers}.lora_A.weight": down, f"{t.diffusers}.lora_B.weight": up})
            if style == "peft_alpha":
                tensors[f"{t.diffusers}.alpha"] = torch.tensor(a)
        elif style == "peft_bare":     # PEFT as saved from a bare UNet: base_model.model. and no root
            path = t.diffusers.removeprefix("unet.")
            tensors.update({f"base_model.model.{path}.lora_A.weight": down, f"base_model.model.{path}.lora_B.weight": up})
        elif style == "diffusers_old":
            tensors.update({f"{t.diffusers}.lora.down.weight": down, f"{t.diffusers}.lora.up.weight": up})
    return tensors, expected


def _write_and_read(tmp_path, tensors, arch_name="sd1"):
    save_file(tensors, str(tmp_path / "x.safetensors"))
    return files.read(str(tmp_path / "x.safetensors"), _arch(arch_name))


def _check(lora, model, expected):
    assert set(lora.modules) == set(expected)
    for name, exp in expected.items():
        got = lora.modules[name].delta(_layer(model, lora.targets[name]).shape)
        torch.testing.assert_close(got, exp.reshape(got.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["kohya", "kohya_sgm", "peft", "peft_alpha", "diffusers_old"])
@pytest.mark.parametrize("arch_name", ["sd1", "sd2", "sdxl"])
def test_safetensors_readers_round_trip(tmp_path, style, arch_name):
    model = tiny_model(arch_name)
    tensors, expected = _expected(model, _pick(arch_name), style)
    lora = _write_and_read(tmp_path, tensors, arch_name)
    assert lora.format == {"kohya_sgm": "kohya", "peft_alpha": "peft", "diffusers_old": "diffusers"}.get(style, style)
    assert lora.unmatched == []
    _check(lora, model, expected)


def test_peft_saved_from_a_bare_unet(tmp_path):
    model = tiny_model("sd1")
    targets = [t for t in _pick("sd1") if t.is_unet]
    tensors, expected = _expected(model, targets, "peft_bare")
    _check(_write_and_read(tmp_path, tensors), model, expected)


def test_diffusers_attention_processor_keys(tmp_path):
    model = tiny_model("sd1")
    g = torch.Generator().manual_seed(3)
    tensors, expected = {}, {}
    for block, leaf, ours in (("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1", "to_out", "to_out_0"),
                              ("unet.mid_block.attentions.0.transformer_blocks.0.attn2", "to_k", "to_k"),
                              ("text_encoder.text_model.encoder.layers.1.self_attn", "to_q", None)):
        key = f"{block}.processor.{leaf}_lora" if block.startswith("unet") else f"{block}.{leaf}_lora"
        name = naming.kohya_key("lora_unet", block.removeprefix("unet.") + "." + ours) if ours else \
            "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
        w = _layer(model, naming.NameIndex(_arch("sd1")).find(name))
        down, up = _lora_parts(w.shape[0], w.shape[1], 2, g)
        tensors.update({f"{key}.down.weight": down, f"{key}.up.weight": up})
        expected[name] = up @ down
    lora = _write_and_read(tmp_path, tensors)
    assert lora.format == "diffusers"
    _check(lora, model, expected)


def test_locon_conv_modules_round_trip(tmp_path):
    model = tiny_model("sd1")
    targets = [t for t in naming.targets(_arch("sd1")) if t.kind == naming.CONV][:5]
    tensors, expected = _expected(model, targets, "kohya")
    lora = _write_and_read(tmp_path, tensors)
    assert lora.network == "locon"
    _check(lora, model, expected)


def test_loha_and_lokr_round_trip(tmp_path):
    model = tiny_model("sd1")
    g = torch.Generator().manual_seed(5)
    t_lin, t_conv, t_kr = [t for t in naming.targets(_arch("sd1")) if t.is_unet and t.kind != naming.CONV1X1][3:6]
    tensors, expected = {}, {}
    # LoHa on a Linear
    w = _layer(model, t_lin)
    r = 2
    w1a, w1b, w2a, w2b = (torch.randn(w.shape[0], r, generator=g), torch.randn(r, w.shape[1], generator=g),
                          torch.randn(w.shape[0], r, generator=g), torch.randn(r, w.shape[1], generator=g))
    tensors.update({f"{t_lin.kohya}.hada_w1_a": w1a, f"{t_lin.kohya}.hada_w1_b": w1b, f"{t_lin.kohya}.hada_w2_a": w2a,
                    f"{t_lin.kohya}.hada_w2_b": w2b, f"{t_lin.kohya}.alpha": torch.tensor(1.0)})
    expected[t_lin.kohya] = (w1a @ w1b) * (w2a @ w2b) * (1.0 / r)
    # LoHa with CP cores on a 3x3 conv: m = sum_ij t[i,j] wa[i] wb[j]
    conv = [t for t in naming.targets(_arch("sd1")) if t.kind == naming.CONV][0]
    w = _layer(model, conv)
    t1, t2 = torch.randn(r, r, 3, 3, generator=g), torch.randn(r, r, 3, 3, generator=g)
    a1, b1 = torch.randn(r, w.shape[0], generator=g), torch.randn(r, w.shape[1], generator=g)
    a2, b2 = torch.randn(r, w.shape[0], generator=g), torch.randn(r, w.shape[1], generator=g)
    tensors.update({f"{conv.kohya}.hada_t1": t1, f"{conv.kohya}.hada_t2": t2, f"{conv.kohya}.hada_w1_a": a1,
                    f"{conv.kohya}.hada_w1_b": b1, f"{conv.kohya}.hada_w2_a": a2, f"{conv.kohya}.hada_w2_b": b2,
                    f"{conv.kohya}.alpha": torch.tensor(4.0)})
    m1 = sum(t1[i, j][None, None] * a1[i][:, None, None, None] * b1[j][None, :, None, None] for i in range(r) for j in range(r))
    m2 = sum(t2[i, j][None, None] * a2[i][:, None, None, None] * b2[j][None, :, None, None] for i in range(r) for j in range(r))
    expected[conv.kohya] = m1 * m2 * (4.0 / r)
    # LoKr: full w1, low-rank w2
    w = _layer(model, t_kr)
    f_out, f_in = 2, 2
    w1 = torch.randn(f_out, f_in, generator=g)
    w2a, w2b = torch.randn(w.shape[0] // f_out, r, generator=g), torch.randn(r, w.shape[1] // f_in, generator=g)
    tensors.update({f"{t_kr.kohya}.lokr_w1": w1, f"{t_kr.kohya}.lokr_w2_a": w2a, f"{t_kr.kohya}.lokr_w2_b": w2b,
                    f"{t_kr.kohya}.alpha": torch.tensor(3.0)})
    w2 = w2a @ w2b
    expected[t_kr.kohya] = torch.stack([torch.cat([w1[i, j] * w2 for j in range(f_in)], 1) for i in range(f_out)]).reshape(w.shape) * 1.5
    lora = _write_and_read(tmp_path, tensors)
    assert {m.network for m in lora.modules.values()} == {"loha", "lokr"}
    _check(lora, model, expected)


def test_kohya_pt_state_dict(tmp_path):
    model = tiny_model("sd1")
    tensors, expected = _expected(model, _pick("sd1"), "kohya")
    torch.save(tensors, tmp_path / "x.pt")
    lora = files.read(str(tmp_path / "x.pt"), _arch("sd1"))
    assert lora.container == "pt"
    _check(lora, model, expected)


def _cloneofsimo_traversal(root, ancestor_classes):
    """cloneofsimo's injector order: every module whose class is targeted, in model.modules() order, then its
    Linear children in named_modules() order."""
    paths = {id(m): n for n, m in root.named_modules()}
    out = []
    for ancestor in root.modules():
        if type(ancestor).__name__ in ancestor_classes:
            for child, m in ancestor.named_modules():
                if isinstance(m, nn.Linear):
                    out.append(f"{paths[id(ancestor)]}.{child}")
    return out


def test_cloneofsimo_order_is_diffusers_module_order():
    arch = _arch("sd1")
    unet = _diffusers_unet("sd1")
    for geglu in (True, False):
        classes = {"Attention", "CrossAttention"} | ({"GEGLU"} if geglu else set())
        assert [t.diffusers.removeprefix("unet.") for t in formats.cloneofsimo_order(arch, geglu)] == \
            _cloneofsimo_traversal(unet, classes)
    from transformers import CLIPTextConfig, CLIPTextModel
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2))
    assert [t.diffusers.removeprefix("text_encoder.") for t in formats.cloneofsimo_te_order(arch, 2)] == \
        _cloneofsimo_traversal(te, {"CLIPAttention"})


@pytest.mark.parametrize("part", ["unet", "te"])
def test_cloneofsimo_pt_list(tmp_path, part):
    model = tiny_model("sd1")
    arch = _arch("sd1")
    order = formats.cloneofsimo_order(arch, True) if part == "unet" else formats.cloneofsimo_te_order(arch, 2)
    g = torch.Generator().manual_seed(7)
    items, expected = [], {}
    for t in order:
        w = _layer(model, t)
        up, down = torch.randn(w.shape[0], 4, generator=g), torch.randn(4, w.shape[1], generator=g)
        items += [up, down]
        expected[t.kohya] = up @ down     # cloneofsimo's scale is 1
    torch.save(items, tmp_path / "x.pt")
    lora = files.read(str(tmp_path / "x.pt"), arch)
    assert lora.format == "cloneofsimo"
    _check(lora, model, expected)


def test_writer_round_trip_hashes_and_no_overwrite(tmp_path):
    from random_networks import make_random_lora

    model = tiny_model("sd1")
    arch = _arch("sd1")
    modules = make_random_lora(model, rank=4, alpha=2.0, conv_rank=2)
    path = str(tmp_path / "out.safetensors")
    meta = files.network_metadata("locon", 4, 2.0, arch, conv_dim=2, conv_alpha=1.0, ss_num_epochs=3)
    files.write_kohya(path, files.kohya_tensors(modules), meta)
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    md = header["__metadata__"]
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0" and md["ss_num_epochs"] == "3"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert md["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert os.listdir(tmp_path) == ["out.safetensors"]          # no temporary file left behind
    lora = files.read(path, arch)
    assert set(lora.modules) == set(modules) and lora.network == "locon"
    for name, m in modules.items():
        for part, t in m.parts.items():
            assert torch.equal(lora.modules[name].parts[part], t)
    with pytest.raises(FileExistsError):
        files.write_kohya(path, files.kohya_tensors(modules), meta)
    assert open(path, "rb").read() == data
    files.write_kohya(path, files.kohya_tensors(modules, torch.float16), meta, overwrite=True)
    assert files.read(path, arch).modules[next(iter(modules))].parts["lora_up.weight"].dtype == torch.float16


# --- malformed files ------------------------------------------------------------------------------------

def _st_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _good_tensors():
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, 1, 1),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, 1, 1),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}


def _save(path, tensors, meta=None):
    save_file(tensors, str(path), meta)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def _case_tensors(**changes):
    t = _good_tensors()
    for k, v in changes.items():
        key = f"lora_unet_down_blocks_0_attentions_0_proj_in.{k}"
        if v is None:
            del t[key]
        else:
            t[key] = v
    return t


MALFORMED = {
    "empty": (lambda p: p.write_bytes(b""), "too short"),
    "truncated_length": (lambda p: p.write_bytes(b"\x05\x00"), "too short"),
    "header_larger_than_file": (lambda p: p.write_bytes(struct.pack("<Q", 10_000) + b"{}"), "claims 10000 bytes"),
    "header_not_json": (lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{oops"), "not valid JSON"),
    "header_not_object": (lambda p: p.write_bytes(_st_bytes([1, 2])), "not a JSON object"),
    "unknown_dtype": (lambda p: p.write_bytes(_st_bytes({"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}, b"x")), "unknown dtype"),
    "offsets_disagree_with_shape": (lambda p: p.write_bytes(_st_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"x" * 16)), "needs 16 bytes"),
    "offsets_past_end": (lambda p: p.write_bytes(_st_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"x" * 16)), "outside the data section"),
    "overlapping_tensors": (lambda p: p.write_bytes(_st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"x" * 12)), "overlap"),
    "metadata_not_strings": (lambda p: p.write_bytes(_st_bytes({"__metadata__": {"ss_network_dim": 4}})), "map names to strings"),
    "truncated_data": (lambda p: (_save(p, _good_tensors()), p.write_bytes(p.read_bytes()[:-20])), "outside the data section"),
    "nan_values": (lambda p: _save(p, _case_tensors(**{"lora_up.weight": torch.full((32, 4, 1, 1), float("nan"))})), "NaN or Inf"),
    "inf_values": (lambda p: _save(p, _case_tensors(**{"lora_down.weight": torch.full((4, 32, 1, 1), float("inf"))})), "NaN or Inf"),
    "rank_mismatch": (lambda p: _save(p, _case_tensors(**{"lora_up.weight": torch.randn(32, 3, 1, 1)})), "disagree on the rank"),
    "missing_partner": (lambda p: _save(p, _case_tensors(**{"lora_up.weight": None})), "lacks lora_up.weight"),
    "alpha_not_scalar": (lambda p: _save(p, _case_tensors(alpha=torch.ones(2))), "alpha must be one number"),
    "alpha_nan": (lambda p: _save(p, _case_tensors(alpha=torch.tensor(float("nan")))), "alpha is nan"),
    "empty_tensor": (lambda p: _save(p, _case_tensors(**{"lora_down.weight": torch.zeros(0, 32, 1, 1), "lora_up.weight": torch.zeros(32, 0, 1, 1)})), "is empty"),
    "unknown_format": (lambda p: _save(p, {"model.diffusion_model.out.2.weight": torch.ones(2)}), "no LoRA keys found"),
    "no_module_fits": (lambda p: _save(p, {"lora_unet_nonexistent_block.lora_down.weight": torch.ones(2, 2),
                                           "lora_unet_nonexistent_block.lora_up.weight": torch.ones(2, 2)}), "fits a SD1 model"),
    "incomplete_loha": (lambda p: _save(p, {"lora_unet_down_blocks_0_attentions_0_proj_out.hada_w1_a": torch.ones(32, 2),
                                            "lora_unet_down_blocks_0_attentions_0_proj_out.hada_w1_b": torch.ones(2, 32)}), "lacks hada_w2_a"),
    "pickled_code": (lambda p: torch.save({"x": Evil()}, p), "never loaded"),
    "not_a_pickle": (lambda p: p.write_bytes(b"this is not a torch file at all"), "not a readable PyTorch file"),
    "list_of_non_tensors": (lambda p: torch.save([1, 2, 3], p), "not a list of tensors"),
    "wrong_extension": (lambda p: p.write_bytes(b"x"), "unknown file type"),
    "folder": (lambda p: p.mkdir(), "is a folder"),
    "missing_file": (lambda p: None, "no such file"),
}
_EXT = {"pickled_code": ".pt", "not_a_pickle": ".pt", "list_of_non_tensors": ".pt", "wrong_extension": ".txt"}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_raise_one_clear_error(tmp_path, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make, phrase = MALFORMED[case]
    path = tmp_path / f"{case}{_EXT.get(case, '.safetensors')}"
    make(path)
    with pytest.raises(LoraFileError) as err:
        files.read(str(path))
    assert str(path) in str(err.value) and phrase in str(err.value), str(err.value)
    assert not (tmp_path / "pwned_marker").exists()


def test_lora_for_another_architecture(tmp_path):
    tensors, _ = _expected(tiny_model("sdxl"), _pick("sdxl"), "kohya")
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    with pytest.raises(LoraFileError, match="LoRA for SDXL, the model is SD1"):
        files.read(str(tmp_path / "xl.safetensors"), _arch("sd1"))
    tensors, _ = _expected(tiny_model("sd2"), _pick("sd2"), "kohya")
    save_file(tensors, str(tmp_path / "v2.safetensors"))
    with pytest.raises(LoraFileError, match="LoRA for SD2, the model is SD1"):
        files.read(str(tmp_path / "v2.safetensors"), _arch("sd1"))


def test_unmatched_keys_are_reported_by_name(tmp_path):
    tensors = _good_tensors()
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.ones(2, 2)
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.mystery"] = torch.ones(1)
    _save(tmp_path / "x.safetensors", tensors)
    lora = files.read(str(tmp_path / "x.safetensors"))
    assert lora.unmatched == ["lora_unet_down_blocks_0_attentions_0_proj_in.mystery", "lora_unet_not_a_layer.lora_down.weight"]


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x01")
    for args in (["inspect", str(tmp_path / "bad.safetensors")], ["inspect", str(tmp_path / "nope.safetensors")],
                 ["inspect", str(tmp_path / "bad.safetensors"), "--model", "sd9"]):
        out = subprocess.run([sys.executable, "-m", "lora_ext", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out
        assert "Traceback" not in out.stderr and out.stderr.startswith("error: ")
