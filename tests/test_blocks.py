"""Per-block weights (lora-block-weight's conventions): vectors and presets parse or say what to write; every
UNet layer falls in its block; in the engine a block at 0 leaves its layers bit-exact and the blocks' changes
add up to the whole LoRA's, in merge and bypass modes."""
import pytest
import torch

from conftest import tiny_model
from lora_ext import blocks, files, naming
from lora_ext.apply import BYPASS, MERGE, Engine, Request
from random_networks import make_random_lora
from lora_ext.hosts.webui import WebuiHost


def test_vectors_and_presets_parse_and_mistakes_say_what_to_write():
    sd17 = blocks.parse("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5", "sd1")
    assert list(sd17) == list(blocks.SD_BLOCKS) and sd17["OUT11"] == 0.5 and sd17["OUT03"] == 1
    assert sd17["IN00"] == sd17["IN03"] == sd17["OUT02"] == 0          # not named: off, as lora-block-weight
    assert blocks.parse("OUTALL", "sd1") == blocks.parse("1" + ",0" * 7 + ",1" * 9, "sd1")
    assert blocks.parse("midd", "sd2")["M00"] == 1 and blocks.parse("midd", "sd2")["IN01"] == 0
    assert len(blocks.parse(",".join(["1"] * 26), "sd1")) == 26
    xl12 = blocks.parse(",".join(["0.3"] * 12), "sdxl")
    assert list(xl12) == list(blocks.XL_BLOCKS) and xl12["IN04"] == 0.3 and xl12["IN00"] == xl12["OUT08"] == 0
    assert blocks.parse("sdxl-outall", "sdxl") == blocks.parse("1,0,0,0,0,0,1,1,1,1,1,1", "sdxl")
    assert blocks.parse("SDXL-MIDALL", "sdxl")["M00"] == 1 and blocks.parse("SDXL-MIDALL", "sdxl")["IN04"] == 0
    assert blocks.parse("  ", "sd1") is None
    user = blocks.parse_presets("# mine\nFACE: 1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0\n")
    assert blocks.parse("face", "sd1", user)["OUT06"] == 1 and blocks.parse("face", "sd1", user)["OUT07"] == 0
    for text, arch, message in [("1,1,1", "sd1", "SD1/SD2 takes 17 or 26 values"),
                                (",".join(["1"] * 17), "sdxl", "SDXL takes 12 or 20 values"),
                                ("1,x,1", "sd1", "a factor 'x' is not a number"),
                                ("1,nan" + ",1" * 15, "sd1", "a factor 'nan' must be a finite number"),
                                ("1,1e9" + ",1" * 15, "sd1", "must be a finite number from -100 to 100"),
                                ("OUTALL", "sdxl", "the common presets are for SD1/SD2; on SDXL write 12 or 20"),
                                ("SDXL-ALL", "sd1", "is an SDXL preset; on SD1/SD2 write 17 or 26"),
                                ("NOPE", "sd1", "no preset has that name \\(presets: ALL, ALL0.5")]:
        with pytest.raises(ValueError, match=message):
            blocks.parse(text, arch)
    with pytest.raises(ValueError, match="line 2: write NAME:v1,v2"):
        blocks.parse_presets("A:1\nno colon here\n")


@pytest.mark.parametrize("arch", [naming.SD1, naming.SDXL])
def test_every_unet_target_falls_in_a_block_of_its_architecture(arch):
    ids = set(blocks.SD_BLOCKS if arch.name != "sdxl" else blocks.XL_BLOCKS)
    every = naming.targets(arch) + naming.extra_targets(arch)
    assert {blocks.block_of(t) for t in every} - {None} == ids      # every block holds layers on the full model
    # the short vector (17 / 12) names exactly the blocks a LoRA without conv layers reaches
    short = blocks.LAYOUTS[blocks.family(arch.name)][17 if arch.name != "sdxl" else 12]
    assert {blocks.block_of(t) for t in naming.targets(arch) if not t.locon} == set(short)
    outside = [t for t in naming.extra_targets(arch) if t.is_unet and blocks.block_of(t) is None]
    assert {t.diffusers.split(".")[1] for t in outside} <= {"time_embedding", "add_embedding", "conv_norm_out", "conv_out"}


@pytest.mark.parametrize("mode", [MERGE, BYPASS])
def test_a_block_at_zero_is_untouched_and_the_blocks_add_up_to_the_whole(tmp_path, mode):
    model = tiny_model("sd1")
    host = WebuiHost(model)
    path = str(tmp_path / "l.safetensors")
    files.write_kohya(path, files.kohya_tensors(make_random_lora(model)), {"ss_output_name": "l"})
    targets = {n: b for n, b in host.lora_targets().items() if b.target.qkv is None}
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    probes = {n: (torch.randn(2, b.module.in_features, generator=g) if isinstance(b.module, torch.nn.Linear)
                  else torch.randn(1, b.module.in_channels, 4, 4, generator=g)) for n, b in targets.items()}

    def outputs(request):
        engine = Engine(mode=mode)
        engine.apply(host, [request])
        try:
            with torch.no_grad():
                return {n: b.module(probes[n]) for n, b in targets.items()}
        finally:
            engine.restore(host)
            assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())

    plain = outputs(Request(path, 0.0, 0.0))
    whole = outputs(Request(path, 0.8, 0.8))
    present = sorted({blocks.block_of(b.target) for b in targets.values()})
    total = {n: torch.zeros_like(v) for n, v in plain.items()}
    for block in present:
        one = outputs(Request(path, 0.8, 0.8, blocks=tuple((b, 1.0 if b == block else 0.0) for b in present)))
        for n, b in targets.items():
            if blocks.block_of(b.target) != block:
                assert torch.equal(one[n], plain[n]), (block, n)        # bit-exact: not merged at all
            total[n] += one[n] - plain[n]
    for n in targets:
        torch.testing.assert_close(total[n], whole[n] - plain[n], rtol=1e-4, atol=1e-6)


def test_a_slot_carries_block_weights_through_the_api_the_infotext_and_the_panel_runtime(tmp_path):
    """The slot's `block_weights` (API name; `blocks` and `lbw` too) goes into the infotext and pastes back;
    the panel runtime folds the factors in, reads the user's presets file, and a bad text skips that slot
    with a message that says what to write (the model untouched)."""
    from lora_ext.panel import slots as slotlib
    from lora_ext.library import LoraLibrary
    from lora_ext.panel.runtime import PanelRuntime

    slot = slotlib.Slot.from_any({"enabled": True, "model": "l.safetensors", "weight": 0.8, "lbw": " OUTALL "})
    assert slot.block_weights == "OUTALL"
    listed = slotlib.Slot.from_any({"enabled": True, "model": "l.safetensors", "block_weights": [1, 0.5, 0] + [1] * 14})
    assert listed.block_weights == "1,0.5,0" + ",1" * 14
    with pytest.raises(ValueError, match="block weight 'x' is not a number"):
        slotlib.Slot.from_any({"model": "l.safetensors", "block_weights": [1, "x"]})
    params = slotlib.to_infotext([slot], lambda m: None)
    assert params["AddNet Block Weights 1"] == "OUTALL"
    pasted = slotlib.from_infotext(params, 1, lambda n, h: "l.safetensors")[0]
    assert pasted.block_weights == "OUTALL" and pasted.weights == slot.weights and pasted.active
    model = tiny_model("sd1")
    host = WebuiHost(model)
    folder = tmp_path / "loras"
    folder.mkdir()
    files.write_kohya(str(folder / "l.safetensors"), files.kohya_tensors(make_random_lora(model, conv_rank=None)), {})
    files.write_kohya(str(folder / "c.safetensors"), files.kohya_tensors(make_random_lora(model)), {})
    presets = tmp_path / "block_presets.txt"
    presets.write_text("TEONLY:1" + ",0" * 16 + "\n", encoding="utf-8")
    runtime = PanelRuntime(LoraLibrary(lambda: [str(folder)]), block_presets=str(presets))
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        out = runtime.run(host, [slotlib.Slot(True, "l.safetensors", block_weights="teonly")])
        assert not out.messages and out.infotext["AddNet Block Weights 1"] == "teonly"
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])}
        assert changed and all(k.startswith("cond_stage_model.") for k in changed)      # BASE only
        # a LoCon under a 17-value vector: the blocks it does not name are off too (lora-block-weight's to26)
        runtime.run(host, [slotlib.Slot(True, "c.safetensors", block_weights="NONE")])
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
        out = runtime.run(host, [slotlib.Slot(True, "l.safetensors", block_weights="1,2,x")])
        assert "slot 1: skipped: block weights '1,2,x': a factor 'x' is not a number" in out.messages[0]
        assert "AddNet Warning" in out.infotext and "AddNet Model 1" not in out.infotext
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    finally:
        runtime.restore(host)


def _lbw_oracle():
    """lora-block-weight's own `to26` and `ratiodealer` (and the tables they read), taken from its source in
    ../shared without importing the webui it runs in; None where that source is not at hand."""
    import ast
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "a1111", "lora-block-weight", "scripts",
                        "lora_block_weight.py")
    if not os.path.isfile(path):
        return None
    tree = ast.parse(open(path, encoding="utf-8").read())
    wanted = {"BLOCKID26", "BLOCKID17", "BLOCKID12", "BLOCKID20", "BLOCKIDFLUX", "BLOCKNUMS", "BLOCKIDS", "BLOCKS",
              "DEF_WEIGHT_PRESET", "to26", "ratiodealer", "hyphener"}
    body = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in wanted) or
            (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in wanted for t in n.targets))]
    space = {"princ": False}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), space)
    return space


def _builtin_key(target) -> str:
    """The built-in Lora's name of a module (networks.assign_network_names_to_compvis_modules), which
    lora-block-weight matches its blocks against."""
    path = target.webui
    if path.startswith("conditioner.embedders."):
        index, _, rest = path.removeprefix("conditioner.embedders.").partition(".wrapped.")
        return f"{index}_{rest.replace('.', '_')}"
    path = path.removeprefix("cond_stage_model.wrapped.").removeprefix("model.")
    return path.replace(".", "_")


@pytest.mark.parametrize("arch", [naming.SD1, naming.SD2, naming.SDXL])
def test_every_module_gets_the_factor_lora_block_weight_gives_it(arch):
    """Against lora-block-weight's own code (its source in ../shared): for every preset it ships (SD1/SD2),
    the SDXL presets users share, and random vectors of every length, each module's factor is the ratio it
    gives that module's key."""
    lbw = _lbw_oracle()
    if lbw is None:
        pytest.skip("lora-block-weight's source is not at ../shared/a1111/lora-block-weight")
    fam = blocks.family(arch.name)
    texts = []
    if fam == "sd":
        texts += [line.split(":", 1)[1] for line in lbw["DEF_WEIGHT_PRESET"].splitlines()
                  if line.split(":", 1)[0] in blocks.PRESETS]
        assert len(texts) == len(blocks.PRESETS)
        texts += [name for name in blocks.PRESETS]
    else:
        texts += list(blocks.XL_PRESETS)
    g = torch.Generator().manual_seed(1)
    for length in blocks.LAYOUTS[fam]:
        texts.append(",".join(f"{v:.3f}" for v in (torch.rand(length, generator=g) * 2 - 0.5).tolist()))
    every = naming.targets(arch) + naming.extra_targets(arch)
    for text in texts:
        vector = [float(v) for v in (blocks.PRESETS.get(text) or blocks.XL_PRESETS.get(text) or text.split(","))]
        ratios = vector if len(vector) == 26 else lbw["to26"](vector)
        ours = blocks.parse(text, arch.name)
        for target in every:
            theirs, _ = lbw["ratiodealer"](_builtin_key(target), ratios, "")
            assert ours.get(blocks.block_of(target), 1.0) == pytest.approx(theirs, abs=1e-12), (text, target.webui)
