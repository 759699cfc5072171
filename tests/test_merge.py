"""Baking LoRAs into a checkpoint: the merged weights are the engine's, streamed, safely read and written."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, tiny_model
from lora_ext import files
from lora_ext.apply import Engine, Request
from lora_ext.tools.lora_tools import parse_lora_arg
from random_networks import make_random_lora
from lora_ext.hosts.webui import WebuiHost
from lora_ext.merge import Item, MergeError, merge_checkpoint
from lora_ext import tiny


def _setup(tmp_path, arch="sd1"):
    model = tiny_model(arch)
    base = str(tmp_path / f"{arch}.safetensors")
    tiny.save_checkpoint(model, base)
    sd = load_file(base)
    save_file(sd, base, {"modelspec.title": "tiny base"})        # base metadata to carry over
    loras = []
    for i, conv in enumerate((2, None)):
        path = str(tmp_path / f"l{i}.safetensors")
        files.write_kohya(path, files.kohya_tensors(make_random_lora(model, conv_rank=conv, seed=i + 1)), {})
        loras.append(path)
    return model, base, loras


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_merged_weights_are_what_the_engine_computes(tmp_path, arch):
    model, base, (a, b) = _setup(tmp_path, arch)
    out = str(tmp_path / "merged.safetensors")
    report = merge_checkpoint(base, [Item(a, 0.7, 0.3), Item(b, -0.5, 1.0)], out, precision="fp32")
    engine, host = Engine(), WebuiHost(model)
    engine.apply(host, [Request(a, 0.7, 0.3), Request(b, -0.5, 1.0)])
    try:
        live = model.checkpoint_state_dict()
        merged, plain = load_file(out), load_file(base)
        assert set(merged) == set(plain) and report["merged_tensors"] > 0
        changed = 0
        for k, v in merged.items():
            if torch.equal(plain[k], live[k]):
                assert torch.equal(v, plain[k]), k              # untouched tensors pass through as they are
            else:
                torch.testing.assert_close(v, live[k], rtol=1e-5, atol=1e-6, msg=k)
                changed += 1
        assert changed == report["merged_tensors"]
    finally:
        engine.restore(host)


def test_precision_metadata_and_safety(tmp_path):
    _, base, (a, _) = _setup(tmp_path)
    out = str(tmp_path / "m.safetensors")
    report = merge_checkpoint(base, [Item(a)], out, precision="fp16")
    merged = load_file(out)
    assert all(v.dtype == torch.float16 for v in merged.values() if v.is_floating_point())
    from safetensors import safe_open
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "tiny base" and meta["lora_ext_precision"] == "fp16"
    assert json.loads(meta["lora_ext_merged"])[0]["file"] == "l0.safetensors"
    assert report["sha256"] and report["addnet_hash"]
    before = open(out, "rb").read()
    with pytest.raises(MergeError, match="exists"):
        merge_checkpoint(base, [Item(a, 0.1)], out)
    assert open(out, "rb").read() == before
    merge_checkpoint(base, [Item(a, 0.1)], out, overwrite=True)
    assert open(out, "rb").read() != before
    with pytest.raises(MergeError, match="is one of the inputs"):
        merge_checkpoint(base, [Item(a)], base, overwrite=True)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_ckpt_in_and_out_and_pickled_code_refused(tmp_path):
    _, base, (a, _) = _setup(tmp_path)
    sd = load_file(base)
    ckpt = str(tmp_path / "base.ckpt")
    torch.save({"state_dict": sd, "global_step": 1000}, ckpt)
    from_ckpt = str(tmp_path / "from_ckpt.safetensors")
    from_st = str(tmp_path / "from_st.safetensors")
    merge_checkpoint(ckpt, [Item(a)], from_ckpt, precision="fp32")
    merge_checkpoint(base, [Item(a)], from_st, precision="fp32")
    x, y = load_file(from_ckpt), load_file(from_st)
    assert all(torch.equal(x[k], y[k]) for k in y)
    out_ckpt = str(tmp_path / "out.ckpt")
    merge_checkpoint(base, [Item(a)], out_ckpt, precision="fp32")
    back = torch.load(out_ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(back[k], y[k]) for k in y)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    torch.save({"state_dict": {"x": torch.ones(1)}, "evil": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(MergeError, match="cannot be read safely"):
        merge_checkpoint(str(tmp_path / "evil.ckpt"), [Item(a)], str(tmp_path / "e.safetensors"))
    assert not (tmp_path / "pwned").exists()


def test_a_lora_for_another_model_is_refused(tmp_path):
    _, base, _ = _setup(tmp_path)
    xl = str(tmp_path / "xl.safetensors")
    files.write_kohya(xl, files.kohya_tensors(make_random_lora(tiny_model("sdxl"))), {})
    with pytest.raises(MergeError, match="LoRA for SDXL"):
        merge_checkpoint(base, [Item(xl)], str(tmp_path / "x.safetensors"))
    wide = tiny.TinySD(tiny.TinySpec("sd1", model_channels=64))
    w = str(tmp_path / "wide.safetensors")
    files.write_kohya(w, files.kohya_tensors(make_random_lora(wide, conv_rank=None)), {})
    with pytest.raises(MergeError, match="made for another model"):
        merge_checkpoint(base, [Item(w)], str(tmp_path / "y.safetensors"))


def test_cli_merge(tmp_path):
    _, base, (a, b) = _setup(tmp_path)
    run = lambda *args: subprocess.run([sys.executable, "-m", "lora_ext", "merge", *args], cwd=ROOT,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    out = str(tmp_path / "cli.safetensors")
    r = run("--model", base, "--lora", f"{a}:0.5", "--lora", f"{b}:1:0", "--out", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [(x["unet"], x["te"]) for x in report["loras"]] == [(0.5, 0.5), (1.0, 0.0)]
    r = run("--model", base, "--lora", a, "--out", out)
    assert r.returncode == 2 and "exists" in r.stderr and "Traceback" not in r.stderr
    r = run("--model", str(tmp_path / "none.safetensors"), "--lora", a, "--out", str(tmp_path / "z.safetensors"))
    assert r.returncode == 2 and "no such checkpoint" in r.stderr


def test_lora_arguments_keep_paths_with_colons():
    assert parse_lora_arg(r"C:\loras\x.safetensors:0.5:0.25") == (r"C:\loras\x.safetensors", 0.5, 0.25)
    assert parse_lora_arg(r"C:\loras\x.safetensors:0.5") == (r"C:\loras\x.safetensors", 0.5, 0.5)
    assert parse_lora_arg("x.safetensors") == ("x.safetensors", 1.0, 1.0)
    assert parse_lora_arg("a:b.safetensors:-1") == ("a:b.safetensors", -1.0, -1.0)


def test_the_base_config_goes_beside_the_merged_checkpoint(tmp_path):
    """A base of non-standard shapes has its .yaml beside it; without a copy beside the merged file the webui
    would load that with the standard config."""
    _, base, (a, _) = _setup(tmp_path)
    out = str(tmp_path / "merged.safetensors")
    report = merge_checkpoint(base, [Item(a, 0.5, 0.5)], out)
    with open(base.replace(".safetensors", ".yaml"), "rb") as f, open(report["yaml"], "rb") as g:
        assert report["yaml"] == str(tmp_path / "merged.yaml") and f.read() == g.read()
    # a stale config under the new name is not overwritten unless asked
    os.unlink(out)
    with open(report["yaml"], "w") as f:
        f.write("stale")
    with pytest.raises(MergeError, match="merged.yaml exists"):
        merge_checkpoint(base, [Item(a, 0.5, 0.5)], out)
    assert not os.path.exists(out)
    merge_checkpoint(base, [Item(a, 0.5, 0.5)], out, overwrite=True)
    with open(report["yaml"]) as f:
        assert f.read() != "stale"
    # a base without one: no config is written
    os.unlink(base.replace(".safetensors", ".yaml"))
    assert merge_checkpoint(base, [Item(a, 0.5, 0.5)], str(tmp_path / "plain.safetensors"))["yaml"] is None
    assert not os.path.exists(tmp_path / "plain.yaml")


def test_keeping_an_fp16_bases_precision_writes_merged_tensors_in_fp16(tmp_path):
    model, base, (a, _) = _setup(tmp_path)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(base).items()}, base)
    out = str(tmp_path / "kept.safetensors")
    report = merge_checkpoint(base, [Item(a, 0.5, 0.5)], out, precision=None)
    merged = load_file(out)
    assert report["merged_tensors"] > 0 and {v.dtype for v in merged.values() if v.is_floating_point()} == {torch.float16}
