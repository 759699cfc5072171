"""The host contract (lora_ext/hosts/protocol.py) and its factory: every adapter has every member the Protocol
names, with its signature; what training, applying, merging and the tools ask of a host is in the Protocol;
they reach hosts only through the factory and the contract's types; the factory picks by what the model
offers and names a model it cannot take."""
import ast
import inspect
import os
import re

import pytest
import torch

from conftest import ROOT, tiny_model
from forge_shaped import ForgeShaped
from lora_ext import hosts
from lora_ext.hosts.protocol import Host

# the modules of hosts/ a caller may import: the factory, the contract and its types
CONTRACT = {"lora_ext.hosts", "lora_ext.hosts.protocol", "lora_ext.hosts.conditioning", "lora_ext.hosts.base"}
CALLERS = ["train", "apply.py", "merge.py", "tools", "panel", "ui", "glue", "cli.py", "demo.py", "library.py"]


def _members() -> dict:
    """{name: what the Protocol says of it}: 'attribute', 'property' or the function's signature."""
    out = {name: "attribute" for name in Host.__annotations__}
    for name, value in vars(Host).items():
        if isinstance(value, property):
            out[name] = "property"
        elif inspect.isfunction(value) and not name.startswith("_"):
            out[name] = inspect.signature(value)
    return out


def contract_problems(cls, instance=None) -> list:
    """What `cls` lacks or says otherwise than the Protocol: missing members, a property that is a method (or
    the other way), parameters of other names, order or defaults."""
    problems = []
    for name, said in _members().items():
        if said == "attribute":
            if not (hasattr(cls, name) or (instance is not None and hasattr(instance, name))):
                problems.append(f"{name}: missing")
            continue
        have = inspect.getattr_static(cls, name, None)
        if have is None:
            problems.append(f"{name}: missing")
        elif said == "property":
            if not isinstance(have, property):       # functools.cached_property is a property to its callers
                if type(have).__name__ != "cached_property":
                    problems.append(f"{name}: not a property")
        elif not inspect.isfunction(have):
            problems.append(f"{name}: not a method")
        else:
            theirs = [(p.name, p.default) for p in list(inspect.signature(have).parameters.values())[1:]]
            ours = [(p.name, p.default) for p in list(said.parameters.values())[1:]]
            if theirs != ours:
                problems.append(f"{name}: parameters {theirs} where the Protocol has {ours}")
    return problems


@pytest.fixture(scope="module")
def diffusers_host(tmp_path_factory):
    from test_train import _diffusers_folder

    from lora_ext.hosts.diffusers_host import DiffusersHost

    return DiffusersHost(_diffusers_folder(str(tmp_path_factory.mktemp("diffusers")), tiny_model("sd1")))


def test_every_adapter_keeps_the_contract(diffusers_host, tmp_path):
    from lora_ext.hosts.checkpoint import load_checkpoint
    from lora_ext import tiny

    path = str(tmp_path / "c.safetensors")
    tiny.save_checkpoint(tiny_model("sd1"), path)
    live = {"tiny model": hosts.for_model(tiny_model("sd1")), "checkpoint": hosts.for_model(load_checkpoint(path)),
            "diffusers folder": diffusers_host, "Forge-shaped": hosts.for_model(ForgeShaped(tiny.build("sd1")))}
    assert {type(h) for h in live.values()} >= set(hosts.adapters())      # every registered adapter is held
    for what, host in live.items():
        assert contract_problems(type(host), host) == [], what
        assert isinstance(host, Host), what                 # runtime_checkable: every member is there


def test_the_check_finds_an_adapter_that_lacks_or_changes_a_member():
    from lora_ext.hosts.webui import WebuiHost

    class Lacking(WebuiHost):
        count_tokens = None

    class Changed(WebuiHost):
        def encode_text(self, prompts, skip=1, max_tokens=75):
            return super().encode_text(prompts, skip, max_tokens)

        @property
        def checkpoint_blocks(self):
            return []

    model = tiny_model("sd1")
    assert contract_problems(Lacking, Lacking(model)) == ["count_tokens: missing"]
    assert contract_problems(Changed, Changed(model)) == [
        "checkpoint_blocks: not a method",
        "encode_text: parameters [('prompts', <class 'inspect._empty'>), ('skip', 1), ('max_tokens', 75)] where the "
        "Protocol has [('prompts', <class 'inspect._empty'>), ('clip_skip', 1), ('max_tokens', 75)]"]
    with pytest.raises(AssertionError):
        assert contract_problems(type("Nothing", (), {})) == []


def _python_files(names):
    for name in names:
        path = os.path.join(ROOT, "lora_ext", name)
        if os.path.isfile(path):
            yield path
        for folder, _, files in os.walk(path):
            yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def test_callers_ask_hosts_only_what_the_protocol_names():
    members = set(_members())
    asked = {}
    for path in _python_files(CALLERS):
        text = open(path, encoding="utf-8").read()
        for name in re.findall(r"\bhost\.([A-Za-z_]\w*)", text):
            asked.setdefault(name, os.path.relpath(path, ROOT))
    assert asked, "no host use found: the scan is wrong"
    outside = {n: p for n, p in asked.items() if n not in members}
    assert outside == {}, f"asked of hosts but not in hosts/protocol.py: {outside}"


def _imported_modules(path: str) -> set:
    """Every lora_ext.hosts module `path` imports (a submodule named in `from ..hosts import x` included)."""
    package = ".".join(["lora_ext"] + [p for p in os.path.relpath(os.path.dirname(path),
                                                                   os.path.join(ROOT, "lora_ext")).split(os.sep) if p != "."])
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = node.module or ""
            if node.level:
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            hosts_dir = os.path.join(ROOT, "lora_ext", "hosts")
            if base == "lora_ext.hosts":
                out |= {f"{base}.{a.name}" for a in node.names if os.path.isfile(os.path.join(hosts_dir, a.name + ".py"))}
    return {m for m in out if m.startswith("lora_ext.hosts")}


# where a host is opened from a file the caller was given (a checkpoint path, a diffusers folder)
OPENERS = {"lora_ext/cli.py": {"lora_ext.hosts.checkpoint", "lora_ext.hosts.diffusers_host", "lora_ext.hosts.vae_file"},
           "lora_ext/ui/app.py": {"lora_ext.hosts.checkpoint"}}        # the standalone tab's checkpoint switch


def test_callers_reach_hosts_through_the_factory_and_the_contracts_types():
    wrong = {}
    for path in _python_files(CALLERS):
        rel = os.path.relpath(path, ROOT)
        extra = _imported_modules(path) - CONTRACT - OPENERS.get(rel, set())
        if extra:
            wrong[rel] = sorted(extra)
    assert wrong == {}


def test_the_factory_picks_by_what_the_model_offers_and_names_what_it_cannot_take():
    from lora_ext.hosts.forge import ForgeHost
    from lora_ext.hosts.webui import WebuiHost

    assert type(hosts.for_model(tiny_model("sdxl"))) is WebuiHost
    assert type(hosts.for_model(ForgeShaped(tiny_model("sd1")))) is ForgeHost     # forge_objects, not a version

    class Other:        # neither a webui-layout model nor a Forge engine
        model = object()

    with pytest.raises(hosts.UnsupportedModel, match=r"test_hosts.Other\) is of no kind lora_ext works on"):
        hosts.for_model(Other())


def test_on_forge_every_target_binds_to_the_live_layer_under_the_patch_key_forge_knows():
    """Every kohya target of the model binds on the Forge-shaped one to the same layer object as on the webui
    layout, and its patch key is the name of that weight among its patcher's parameters (Forge patches
    nothing else)."""
    tiny = tiny_model("sd1")
    webui, forge = hosts.for_model(tiny), hosts.for_model(ForgeShaped(tiny))
    assert forge.arch == webui.arch and forge.prediction == webui.prediction == "eps"
    assert torch.allclose(forge.alphas_cumprod, webui.alphas_cumprod.float(), rtol=1e-5)
    assert {n: b.module for n, b in forge.applied_targets().items()} == \
        {n: b.module for n, b in webui.applied_targets().items()}
    objects = forge.engine.forge_objects
    params = {"unet": dict(objects.unet.model.named_parameters()), "clip": dict(objects.clip.model.named_parameters())}
    for bound in forge.applied_targets().values():
        part, key = forge.patch_key(bound)
        assert params[part][key] is bound.param, bound.target.kohya
