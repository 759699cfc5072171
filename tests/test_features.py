"""The training loop's feature seam (lora_ext/train/features): a feature registered by one line is called
before the scan, after each step and epoch, records its metadata in every saved LoRA and keeps its state
(JSON and tensors) across a cancel and resume; the numbered saves and previews run on it."""
import os

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_model
from lora_ext.hosts import for_model
from lora_ext import sample_data
from lora_ext.train import features
from lora_ext.train.config import TrainConfig
from lora_ext.train.loop import train

CALLS = []


class Counting(features.Feature):
    """A feature of the kind the next ones are (an EMA keeps tensors, a validation loss values): it counts
    steps into a tensor and records what the loop told it."""
    name = "counting"

    def __init__(self):
        self.total = torch.zeros(3)
        self.seen = 0

    def before_scan(self, host, cfg):
        CALLS.append(("before_scan", cfg.output_name))

    def after_step(self, loop, step, epoch):
        self.total += step
        self.seen += 1
        CALLS.append(("step", step, epoch))

    def after_epoch(self, loop, epoch, last):
        CALLS.append(("epoch", epoch, last))

    def metadata(self, loop):
        return {"lora_ext_counted": str(self.seen)}

    def state(self):
        return {"seen": self.seen}, {"total": self.total}

    def load_state(self, values, tensors):
        self.seen, self.total = values["seen"], tensors["total"].clone()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sample_data.make_sample_dataset(str(tmp_path_factory.mktemp("data")), size=64, per_concept=2)


def _cfg(data, out, **kw):
    return TrainConfig(**{**dict(train_data_dir=data["train"], caption_extension=".txt", output_dir=str(out),
                                 output_name="f", resolution="64", train_batch_size=1, max_train_steps=6,
                                 network_dim=2, learning_rate=1e-3, mixed_precision="no", seed=3), **kw})


def test_a_feature_of_one_line_is_called_saved_and_resumed(data, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "FEATURES", features.FEATURES + ("test_features:Counting",))
    CALLS.clear()
    host = for_model(tiny_model("sd1"))
    steps = {"n": 0}
    cancelled = train(host, _cfg(data, tmp_path), on_event=lambda e: steps.__setitem__("n", e.step) if e.kind == "step"
                      else None, should_stop=lambda: steps["n"] >= 4)
    assert cancelled.cancelled and cancelled.steps == 4
    assert CALLS[0] == ("before_scan", "f") and [c[1] for c in CALLS if c[0] == "step"] == [1, 2, 3, 4]
    with safe_open(cancelled.lora_path, "pt") as f:
        assert f.metadata()["lora_ext_counted"] == "4"
    CALLS.clear()
    resumed = train(host, _cfg(data, tmp_path, resume=cancelled.state_path))
    assert resumed.steps == 6 and [c[1] for c in CALLS if c[0] == "step"] == [5, 6]
    epochs = [c for c in CALLS if c[0] == "epoch"]
    assert epochs and epochs[-1][2] is True                 # told when the run's last epoch ends
    with safe_open(resumed.lora_path, "pt") as f:
        assert f.metadata()["lora_ext_counted"] == "6"      # its state came back: 4 before the cancel, 2 after


def test_the_numbered_saves_and_previews_are_features_of_the_runs_that_want_them(data, tmp_path):
    assert [type(f).__name__ for f in features.for_run(_cfg(data, tmp_path))] == []
    wanted = features.for_run(_cfg(data, tmp_path, save_every_n_steps=2, sample_every_n_epochs=1,
                                   sample_prompts=["a red circle"]))
    assert [type(f).__name__ for f in wanted] == ["Previews", "Snapshots"]
    events = []
    train(for_model(tiny_model("sd1")), _cfg(data, tmp_path, save_every_n_steps=2, max_train_steps=5),
          on_event=events.append)
    assert sorted(os.listdir(tmp_path)) == ["f-step000002.safetensors", "f-step000004.safetensors", "f.safetensors"]


def test_every_registered_feature_is_a_feature_with_a_name():
    registered = features.registered()
    assert registered and all(issubclass(c, features.Feature) and c.name for c in registered)
    assert len({c.name for c in registered}) == len(registered)
