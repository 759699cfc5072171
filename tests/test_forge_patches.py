"""The panel on a Forge-shaped model (tests/forge_shaped.py; the real-Forge tier holds it against Forge): the
engine stages patches instead of writing weights, our patch type computes the weight our in-place merge
writes on the webui layout (every type, block weights), each part's set is identified by what is in it, and
what Forge cannot keep (a bake) is refused with the model untouched."""
import copy

import pytest
import torch

from conftest import tiny_model
from forge_shaped import ForgeShaped
from lora_ext import files, hosts
from random_networks import make_random_lora, make_random_network
from lora_ext.hosts.forge import PATCH_TYPE, calculate
from lora_ext.library import LoraLibrary
from lora_ext.panel.runtime import PanelRuntime
from lora_ext.panel.slots import Slot


@pytest.fixture(autouse=True)
def forge_table(monkeypatch):
    """Forge's table of weight calculators (backend.patcher.lora.extra_weight_calculators), which ours joins."""
    import sys
    import types

    table = {}
    for name in ("backend", "backend.patcher", "backend.patcher.lora"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["backend.patcher.lora"].extra_weight_calculators = table
    sys.modules["backend.patcher"].lora = sys.modules["backend.patcher.lora"]
    sys.modules["backend"].patcher = sys.modules["backend.patcher"]
    return table


@pytest.fixture
def world(tmp_path):
    model = tiny_model("sd1")
    folder = tmp_path / "Lora"
    folder.mkdir()
    files.write_kohya(str(folder / "locon.safetensors"), files.kohya_tensors(make_random_lora(model, seed=3)), {})
    files.write_kohya(str(folder / "loha.safetensors"), files.kohya_tensors(make_random_network(model, "loha")), {})
    return model, LoraLibrary(lambda: [str(folder)])


def _weights(root) -> dict:
    return {k: v.detach().clone() for k, v in root.state_dict().items()}


@pytest.mark.parametrize("name,blocks", [("locon.safetensors", ""), ("loha.safetensors", ""),
                                         ("locon.safetensors", "OUTALL")])
def test_forge_patches_give_the_weights_the_webui_merge_writes(world, forge_table, name, blocks):
    model, library = world
    pristine = _weights(model)
    slot = Slot(enabled=True, model=name, separate=True, unet=0.7, te=0.4, block_weights=blocks)
    webui = copy.deepcopy(model)
    PanelRuntime(library).run(hosts.for_model(webui), [slot])
    merged = _weights(webui)

    forge = hosts.for_model(ForgeShaped(model))
    runtime = PanelRuntime(library)
    outcome = runtime.run(forge, [slot])
    assert all(torch.equal(v, pristine[k]) for k, v in _weights(model).items())     # staged, nothing written
    assert outcome.infotext["AddNet Model 1"].startswith(name.rsplit(".", 1)[0])
    objects = forge.engine.forge_objects
    original_unet, original_clip = objects.unet, objects.clip
    assert forge.patcher.install("clip") > 0 and forge.patcher.install("unet") > 0
    assert forge_table == {PATCH_TYPE: calculate}
    assert objects.unet is not original_unet and original_unet.lora_patches == {}     # a clone carries ours
    assert objects.clip is not original_clip and original_clip.lora_patches == {}
    roots = {"unet": objects.unet.model, "clip": objects.clip.cond_stage_model}
    # the same weight's name in the webui layout
    webui_key = {"unet": lambda k: "model." + k, "clip": lambda k: "cond_stage_model.wrapped." + k.removeprefix("clip_l.")}
    checked = 0
    for part, patcher in (("unet", objects.unet), ("clip", objects.clip)):
        [(identifier, patches)] = patcher.lora_patches.items()
        assert identifier[0].startswith("lora_ext:")
        params = dict(roots[part].named_parameters())
        for key, (kind, contributions) in patches.items():
            assert kind == PATCH_TYPE
            got = calculate(params[key].detach().float().clone(), 1.0, contributions)
            want = merged[webui_key[part](key)]
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), key
            checked += 1
    changed = sum(not torch.equal(merged[k], pristine[k]) for k in merged)
    assert checked == changed         # every weight the webui merge changed is patched, and only those


def test_the_identifier_changes_exactly_when_what_is_patched_changes(world):
    model, library = world
    forge = hosts.for_model(ForgeShaped(model))
    runtime = PanelRuntime(library)

    def staged(weight, name="locon.safetensors"):
        runtime.run(forge, [Slot(enabled=True, model=name, weight=weight)])
        return {part: digest for part, (digest, _) in forge.patcher.staged.items()}

    first = staged(0.5)
    assert staged(0.5) == first
    assert staged(0.6) != first and staged(0.5, "loha.safetensors") != first
    runtime.run(forge, [])
    assert all(patches == {} for _, patches in forge.patcher.staged.values())
    assert forge.patcher.install("unet") == 0 and forge.engine.forge_objects.unet.lora_patches == {}


def test_bake_on_forge_is_refused_with_the_model_untouched(world):
    model, library = world
    pristine = _weights(model)
    forge = hosts.for_model(ForgeShaped(model))
    outcome = PanelRuntime(library).bake(forge, [("locon.safetensors", 1.0, 1.0)])
    assert outcome.report is None and "Bake is not available on this model" in outcome.messages[0]
    assert all(torch.equal(v, pristine[k]) for k, v in _weights(model).items())


def test_training_through_the_forge_adapter_gives_the_lora_the_webui_layout_gives(tmp_path):
    """The same modules seen through Forge's shape (its encoders and tokenizers apart, its UNet under a
    KModel, its schedule as sigmas) train the same LoRA, bit for bit, and give the weights back; Forge is
    asked to restore its patched weights first."""
    from safetensors.torch import load_file
    from test_train import _cfg

    from lora_ext import sample_data
    from lora_ext.train.loop import train

    data = sample_data.make_sample_dataset(str(tmp_path / "data"), size=64, per_concept=3)
    model = tiny_model("sd1")
    pristine = _weights(model)
    shaped = ForgeShaped(model)
    results = {}
    for name, host in (("webui", hosts.for_model(model)), ("forge", hosts.for_model(shaped))):
        cfg = _cfg(data, tmp_path / name, max_train_steps=2)
        with host.training_weights():
            results[name] = load_file(train(host, cfg).lora_path)
    assert results["webui"].keys() == results["forge"].keys() and results["forge"]
    assert all(torch.equal(results["webui"][k], results["forge"][k]) for k in results["webui"])
    assert all(torch.equal(v, pristine[k]) for k, v in _weights(model).items())
    # Forge was asked to restore its patched weights, then to merge again what its objects ask for (here the
    # objects after its LoRAs are the original ones: no built-in LoRA)
    objects = shaped.forge_objects_original
    assert objects.unet.refreshed == 2 and objects.clip.refreshed == 2


def test_a_clip_text_model_carrying_a_text_projection_pools_as_one_with_projection():
    """Forge's SDXL bigG is a transformers CLIPTextModel with a `text_projection` layer set on it (and pools
    through it); diffusers' is a CLIPTextModelWithProjection: the same weights give the same pooled output."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_ext.hosts import text_encoding

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, projection_dim=32)
    torch.manual_seed(0)
    diffusers_like = CLIPTextModelWithProjection(cfg)
    forge_like = CLIPTextModel(cfg)
    forge_like.text_model.load_state_dict(diffusers_like.text_model.state_dict())
    forge_like.text_projection = torch.nn.Linear(32, 32, bias=False)
    forge_like.text_projection.weight = diffusers_like.text_projection.weight
    ids = torch.tensor([[text_encoding.START, 320, 1125, text_encoding.END] + [0] * 73])
    states, pooled = text_encoding._hf(text_encoding.Holder(forge_like, None), ids, 2, final_norm=False, pooled=True)
    want_states, want = text_encoding._hf(text_encoding.Holder(diffusers_like, None), ids, 2, final_norm=False,
                                          pooled=True)
    assert pooled is not None and torch.equal(pooled, want) and torch.equal(states, want_states)
    forge_like.text_projection.weight = None        # Forge's CLIP-L carries the layer, never loaded
    assert text_encoding._hf(text_encoding.Holder(forge_like, None), ids, 2)[1] is None
