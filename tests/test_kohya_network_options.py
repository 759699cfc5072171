"""kohya's network options beside network_args: --scale_weight_norms (kohya's max-norm), --dim_from_weights,
and LyCORIS's full-matrix idiom (a LoKr dim of 100000)."""
import pytest
import torch

from conftest import tiny_model
from lora_ext.train import max_norm
from lora_ext.train.config import ConfigError, from_dict


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_ext.sample_data import make_sample_dataset
    return make_sample_dataset(str(tmp_path_factory.mktemp("data")), size=64, per_concept=1)


def _train(data, out, name, **options):
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.train.loop import train

    cfg = from_dict({"train_data_dir": data["train"], "resolution": "64", "max_train_steps": 1,
                     "output_dir": str(out), "output_name": name, **options})
    return train(WebuiHost(tiny_model("sd1")), cfg)


def _kohya_max_norm(up, down, alpha, limit):
    """kohya's apply_max_norm_regularization for one module, written from its description."""
    scale = alpha / down.shape[0]
    updown = (up @ down) * scale
    norm = updown.norm().clamp(min=limit / 2)
    ratio = torch.clamp(norm, max=limit) / norm
    return up * ratio.sqrt(), down * ratio.sqrt()


def test_scale_weight_norms_is_kohyas_max_norm():
    from lora_ext.networks.kinds.lora import LoRAModule
    from lora_ext.networks.kinds.trainable import Geometry

    torch.manual_seed(0)
    modules = torch.nn.ModuleDict({f"m{i}": LoRAModule(Geometry((16, 12)), 4, 2.0) for i in range(3)})
    with torch.no_grad():
        for i, m in enumerate(modules.values()):
            m.lora_up.weight.normal_(std=0.5 * (i + 1))
    want = {n: _kohya_max_norm(m.lora_up.weight.clone(), m.lora_down.weight.clone(), 2.0, 1.0)
            for n, m in modules.items()}
    network = type("N", (), {"loras": modules})()
    scaled, mean, largest = max_norm.apply(network, 1.0)
    assert scaled >= 1 and largest <= 1.0 + 1e-5
    for n, m in modules.items():
        torch.testing.assert_close(m.lora_up.weight, want[n][0])
        torch.testing.assert_close(m.lora_down.weight, want[n][1])
    with pytest.raises(ConfigError, match="scale_weight_norms is done for LoRA and LoCon"):
        from_dict({"scale_weight_norms": 1, "network_module": "lycoris.kohya", "network_args": ["algo=loha"]})
    assert from_dict({"scale_weight_norms": "1.0"}).scale_weight_norms == 1.0


def test_dim_from_weights_takes_the_files_layers_ranks_and_alphas(data, tmp_path):
    from lora_ext import files

    first = _train(data, tmp_path, "first", network_dim=4, network_alpha=2, network_args=["conv_dim=2", "conv_alpha=1"],
                   network_train_unet_only=True)
    again = _train(data, tmp_path, "again", network_dim=16, network_alpha=16, network_weights=first.lora_path,
                   dim_from_weights=True)
    a, b = files.read(first.lora_path).modules, files.read(again.lora_path).modules
    assert set(a) == set(b) and all(name.startswith("lora_unet_") for name in b)       # no text-encoder layers
    assert {n: (m.rank, m.alpha) for n, m in a.items()} == {n: (m.rank, m.alpha) for n, m in b.items()}
    assert {m.rank for m in b.values()} == {2, 4}
    with pytest.raises(ConfigError, match="give network_weights"):
        from_dict({"dim_from_weights": True})
    with pytest.raises(ValueError, match="holds lora modules; this run trains loha"):
        _train(data, tmp_path, "x", network_module="lycoris.kohya", network_args=["algo=loha"],
               network_weights=first.lora_path, dim_from_weights=True)


def test_a_lokr_dim_of_100000_is_lycoris_full_matrix(data, tmp_path):
    from safetensors.torch import load_file

    result = _train(data, tmp_path, "full", network_module="lycoris.kohya", network_dim=100000, network_alpha=1,
                    network_args=["algo=lokr", "conv_dim=100000", "conv_alpha=1"])
    tensors = load_file(result.lora_path)
    assert {k.split(".", 1)[1] for k in tensors} == {"lokr_w1", "lokr_w2", "alpha"}
    with pytest.raises(ConfigError, match="network_dim = 100000 is out of range"):
        from_dict({"network_dim": 100000})          # kohya's LoRA: no such idiom


def test_base_weights_train_on_top_of_merged_loras_and_give_the_model_back(data, tmp_path):
    """kohya's base_weights: the files merged at their multipliers for the run (the loss is the merged
    model's), the webui's model bit-exact afterwards."""
    from test_train import _assert_same, _model_state

    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.train.loop import train

    base = _train(data, tmp_path, "base", network_dim=4, learning_rate=5e-2, max_train_steps=3)
    model = tiny_model("sd1")
    before = _model_state(model)
    runs = {}
    for name, extra in (("plain", {}), ("on_base", {"base_weights": [base.lora_path], "base_weights_multiplier": "2"})):
        events = []
        cfg = from_dict({"train_data_dir": data["train"], "resolution": "64", "max_train_steps": 1, "network_dim": 2,
                         "output_dir": str(tmp_path), "output_name": name, **extra})
        runs[name] = (train(WebuiHost(model), cfg, on_event=events.append), events)
        _assert_same(model, before)
    assert runs["plain"][0].losses != runs["on_base"][0].losses        # the merged model's loss
    assert any("base_weights: " in e.text and "merged into the model" in e.text for e in runs["on_base"][1])
    with pytest.raises(ConfigError, match="base_weights 'nowhere.safetensors': no such file"):
        from_dict({"base_weights": "nowhere.safetensors"})
    with pytest.raises(ConfigError, match="base_weights_multiplier 'x' is not a number"):
        from_dict({"base_weights": [base.lora_path], "base_weights_multiplier": ["x"]})
