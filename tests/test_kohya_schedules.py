"""kohya's other schedules: transformers' inverse_sqrt, cosine_with_min_lr and warmup_stable_decay (kohya
passes them half its cycles), lr_decay_steps, and lr_scheduler_type (any torch scheduler, stepped each
optimizer step, resumed where it stopped)."""
import math

import pytest
import torch

from conftest import tiny_model
from lora_ext.train.config import ConfigError, from_dict


@pytest.mark.parametrize("warmup,timescale", [(10, None), (10, 40), (5, 7)])
def test_inverse_sqrt_is_transformers(warmup, timescale):
    from transformers.optimization import get_inverse_sqrt_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    theirs = get_inverse_sqrt_schedule(opt, num_warmup_steps=warmup, timescale=timescale)
    cfg = from_dict({"lr_scheduler": "inverse_sqrt", "lr_warmup_steps": warmup,
                     "lr_scheduler_timescale": timescale or 0, "learning_rate": 1.0})
    for step in range(60):
        assert cfg.lr_at(step, 60) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), step
        opt.step()
        theirs.step()


def _cosine_min(step, total, warmup, cycles, floor):
    """transformers' cosine-with-min-lr factor (optimization.py), with kohya's num_cycles = cycles / 2."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * (cycles / 2) * 2 * progress)) * (1 - floor) + floor)


def _wsd(step, warmup, stable, decay, cycles, floor):
    """transformers' warmup-stable-decay factor, with kohya's num_cycles = cycles / 2."""
    if step < warmup:
        return step / max(1, warmup)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = (step - warmup - stable) / max(1, decay)
        return (1 - floor) * max(0.0, 0.5 * (1 + math.cos(math.pi * (cycles / 2) * 2 * progress))) + floor
    return floor


@pytest.mark.parametrize("cycles", [1, 3])
def test_cosine_with_min_lr_and_warmup_stable_decay_as_kohya_calls_them(cycles):
    cos = from_dict({"lr_scheduler": "cosine_with_min_lr", "lr_warmup_steps": 0.1, "lr_scheduler_num_cycles": cycles,
                     "lr_scheduler_min_lr_ratio": 0.2})
    assert [cos.lr_at(s, 50) for s in range(50)] == pytest.approx([_cosine_min(s, 50, 5, cycles, 0.2) for s in range(50)])
    wsd = from_dict({"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 4, "lr_decay_steps": 0.3,
                     "lr_scheduler_num_cycles": cycles, "lr_scheduler_min_lr_ratio": 0.1})
    assert [wsd.lr_at(s, 50) for s in range(50)] == pytest.approx([_wsd(s, 4, 50 - 4 - 15, 15, cycles, 0.1)
                                                                   for s in range(50)])
    with pytest.raises(ConfigError, match="needs lr_scheduler_min_lr_ratio"):
        from_dict({"lr_scheduler": "cosine_with_min_lr"})


def test_lr_scheduler_type_is_checked_before_the_model(tmp_path):
    for given, problem in (({"lr_scheduler_type": "NoSuchLR"}, "NoSuchLR"),
                           ({"lr_scheduler_type": "ReduceLROnPlateau"}, "needs a metric"),
                           ({"lr_scheduler_type": "StepLR"}, "lr_scheduler_args for StepLR"),
                           ({"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=2"],
                             "lr_warmup_steps": 3}, "lr_warmup_steps must be 0"),
                           ({"lr_scheduler_type": "nopackage.Sched"}, "no package nopackage")):
        with pytest.raises(ConfigError, match=problem):
            from_dict(given)
    assert from_dict({"lr_scheduler_type": "torch.optim.lr_scheduler.StepLR", "lr_scheduler_args": "step_size=2 gamma=0.5"})


def _run(data, out, steps, **options):
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.train.loop import train

    cfg = from_dict({"train_data_dir": data["train"], "resolution": "64", "network_dim": 2, "max_train_steps": steps,
                     "learning_rate": 1e-4, "lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=2", "gamma=0.5"],
                     "output_dir": str(out), "output_name": "s", **options})
    events = []
    return train(WebuiHost(tiny_model("sd1")), cfg, on_event=events.append), events


def test_a_torch_scheduler_steps_with_the_optimizer_and_resumes_where_it_stopped(tmp_path):
    from safetensors.torch import load_file

    from lora_ext.sample_data import make_sample_dataset

    data = make_sample_dataset(str(tmp_path / "data"), size=64, per_concept=1)
    straight, events = _run(data, tmp_path / "a", 5)
    lrs = [e.lr for e in events if e.kind == "step"]
    assert lrs == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5])     # StepLR(2, 0.5): the rate of each update
    half, _ = _run(data, tmp_path / "b", 3, save_state=True)
    resumed, events = _run(data, tmp_path / "b", 5, resume=half.state_path)
    assert [e.lr for e in events if e.kind == "step"] == pytest.approx(lrs[3:])
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    for k in a:         # as the other resume tests compare (tests/test_train.py)
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
