"""kohya's saving options: save_last_n_epochs / save_last_n_steps (the older numbered saves removed as kohya
removes them), save_n_epoch_ratio, save_state_on_train_end, no_metadata, output_config; log_with."""
import os

import pytest

from conftest import tiny_model
from lora_ext import files
from lora_ext.train.config import ConfigError, from_dict


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lora_ext.sample_data import make_sample_dataset
    return make_sample_dataset(str(tmp_path_factory.mktemp("data")), size=64, per_concept=1)


def _train(data, out, **options):
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.train.loop import train

    cfg = from_dict({"train_data_dir": data["train"], "resolution": "64", "train_batch_size": 4, "network_dim": 2,
                     "output_dir": str(out), "output_name": "n", **options})
    return train(WebuiHost(tiny_model("sd1")), cfg)


def _numbered(out) -> set:
    return {f[2:-12] for f in os.listdir(out) if f.startswith("n-") and f.endswith(".safetensors")}


def test_save_last_n_epochs_keeps_kohyas_last_saves(data, tmp_path):
    # 8 samples an epoch at batch 4: 2 steps an epoch; saves after epochs 1-4 (5 is the final save); at each,
    # kohya removes the save of epoch (this one - every x N)
    result = _train(data, tmp_path, max_train_epochs=5, save_every_n_epochs=1, save_last_n_epochs=2)
    assert result.steps == 10 and _numbered(tmp_path) == {"000003", "000004"}
    assert os.path.isfile(tmp_path / "n.safetensors")


def test_save_last_n_steps_keeps_kohyas_last_saves(data, tmp_path):
    # saves at steps 2, 4, 6, 8; at step s kohya removes the save of step (s - N - 1) cut down to a multiple of 2
    _train(data, tmp_path, max_train_steps=10, save_every_n_steps=2, save_last_n_steps=3)
    assert _numbered(tmp_path) == {"step000006", "step000008"}


def test_save_n_epoch_ratio_and_a_state_at_the_end_only(data, tmp_path):
    result = _train(data, tmp_path, max_train_epochs=4, save_n_epoch_ratio=2, save_state_on_train_end=True)
    assert _numbered(tmp_path) == {"000002"}            # every floor(4 / 2) epochs; the 4th is the final save
    assert result.state_path and os.path.isdir(result.state_path)
    assert not os.path.exists(tmp_path / "n-000002-state")


def test_no_metadata_keeps_what_loading_needs(data, tmp_path):
    _train(data, tmp_path, max_train_steps=1, no_metadata=True)
    lora = files.read(str(tmp_path / "n.safetensors"))
    keys = set(lora.metadata)
    assert "ss_network_dim" in keys and "ss_tag_frequency" not in keys and "ss_learning_rate" not in keys
    # and the file's own hashes, which kohya's save_weights adds to any metadata
    assert all(k.startswith(("ss_", "modelspec.", "sshs_")) for k in keys), keys
    assert lora.modules


def test_output_config_writes_the_options_and_never_over_a_file(tmp_path):
    from test_train import _cli

    out = _cli("train", "--output_config", "--config_file", "mine", "--network_dim", "8", "--shuffle_caption",
               "--train_data_dir", "somewhere", "--loss_type", "huber", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    from lora_ext.train.config import load_toml
    cfg = load_toml(str(tmp_path / "mine.toml"))
    assert (cfg.network_dim, cfg.shuffle_caption, cfg.train_data_dir, cfg.loss_type) == (8, True, "somewhere", "huber")
    again = _cli("train", "--output_config", "--config_file", "mine.toml", "--network_dim", "4", cwd=tmp_path)
    assert again.returncode != 0 and "exists" in again.stderr
    assert load_toml(str(tmp_path / "mine.toml")).network_dim == 8


def test_log_with_tensorboard_is_ours_and_wandb_is_said(tmp_path):
    assert from_dict({"log_with": "tensorboard", "logging_dir": str(tmp_path)}).log_with == "tensorboard"
    with pytest.raises(ConfigError, match="give it"):
        from_dict({"log_with": "tensorboard"})
    with pytest.raises(ConfigError, match="wandb is not used"):
        from_dict({"log_with": "wandb", "wandb_run_name": "x"})
