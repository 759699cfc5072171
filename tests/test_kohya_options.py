"""kohya's train_network.py options (train.kohya_options): every one of them is lora_ext's, an old spelling,
without effect, read only beside another, or refused with a reason; given at kohya's default each is accepted;
every problem of a configuration comes out in one message."""
import importlib.util
import json
import os
import subprocess

import pytest

from lora_ext.train import kohya_options as k
from test_train import data  # noqa: F401  (a fixture)
from lora_ext.train.config import ConfigError, TrainConfig, field_names, from_dict, notes


def test_every_kohya_option_has_its_place_and_nothing_else_is_taken():
    ours = field_names()
    places = [ours & set(k.KOHYA_DEFAULTS), set(k.ALIASES), set(k.NO_EFFECT), set(k.REFUSED),
              set(k.NEEDS) - set(k.REFUSED)]
    assert len(k.KOHYA_DEFAULTS) == 193
    assert set().union(*places) == set(k.KOHYA_DEFAULTS)
    assert sum(len(p) for p in places) == len(k.KOHYA_DEFAULTS)        # each in one place
    assert set(k.NEEDS.values()) <= set(k.KOHYA_DEFAULTS)


@pytest.mark.parametrize("name", sorted(set(k.KOHYA_DEFAULTS) - field_names()))
def test_each_kohya_option_at_its_default_is_accepted_and_a_refused_one_off_it_is_named(name):
    default = k.KOHYA_DEFAULTS[name]
    cfg = from_dict({name: default})
    assert cfg == TrainConfig() or name in k.ALIASES
    if name in k.REFUSED:
        other = "x" if not isinstance(default, (bool, int, float)) or default is None else (
            not default if isinstance(default, bool) else default + 1)
        with pytest.raises(ConfigError, match=rf"{name}: {k.REFUSED[name][:20]}"):
            from_dict({name: other, **({k.NEEDS[name]: 0.1} if name in k.NEEDS else {})})


def test_all_of_kohyas_defaults_at_once_make_a_valid_config():
    """A configuration kohya would write of its own defaults (None: not written) loads."""
    given = {n: v for n, v in k.KOHYA_DEFAULTS.items() if v is not None}
    cfg = from_dict(given)
    assert cfg.caption_extension == ".caption" and cfg.learning_rate == 2e-6 and cfg.max_train_steps == 1600


def test_the_kohya_ss_guis_keys_at_their_usual_values_are_accepted():
    """What the kohya_ss GUI writes into every configuration it saves."""
    gui = {"loss_type": "l2", "huber_c": 0.1, "huber_schedule": "snr", "huber_scale": 1, "lr_scheduler_args": [],
           "sample_sampler": "euler_a", "dynamo_backend": "no", "wandb_run_name": "", "bucket_no_upscale": False,
           "log_tracker_name": "", "metadata_title": "", "caption_separator": ",", "noise_offset_random_strength": True,
           "multires_noise_discount": 0.3, "validation_seed": 0, "max_data_loader_n_workers": 0}
    cfg = from_dict(gui)
    assert cfg == TrainConfig()
    lines = notes(gui)
    assert any("sample_sampler" in n and "DDIM" in n for n in lines)
    assert not any("loss_type" in n or "huber" in n for n in lines)


def test_an_option_read_only_beside_another_is_judged_when_that_one_is_given():
    assert from_dict({"noise_offset_random_strength": True}) == TrainConfig()
    with pytest.raises(ConfigError, match="noise_offset_random_strength"):
        from_dict({"noise_offset": 0.1, "noise_offset_random_strength": True})
    with pytest.raises(ConfigError, match="loss_type: lora_ext does not do this yet"):
        from_dict({"loss_type": "huber", "huber_c": 0.2})


def test_old_spellings_become_the_options_they_stand_for():
    assert from_dict({"caption_extention": ".txt"}).caption_extension == ".txt"
    assert from_dict({"use_8bit_adam": True}).optimizer_type == "AdamW8bit"
    if importlib.util.find_spec("lion_pytorch"):
        assert from_dict({"use_lion_optimizer": "true"}).optimizer_type == "Lion"
    else:       # the optimizer is checked before any model loads: its package is named
        with pytest.raises(ConfigError, match="Lion needs the package lion-pytorch"):
            from_dict({"use_lion_optimizer": "true"})
    assert from_dict({"use_8bit_adam": False}).optimizer_type == TrainConfig().optimizer_type
    with pytest.raises(ConfigError, match="use_8bit_adam asks for optimizer_type"):
        from_dict({"use_8bit_adam": True, "optimizer_type": "Lion"})


def test_every_problem_of_a_configuration_is_in_one_message():
    given = {"loss_type": "huber", "fp8_base": True, "bogus_option": 1, "learning_rate": "fast",
             "max_token_length": 100, "network_args": ["algo=nope"], "validation_split": 0.1}
    with pytest.raises(ConfigError) as e:
        from_dict(given, "my.toml")
    msg = str(e.value)
    assert msg.startswith("my.toml: ")
    for part in ("loss_type", "fp8_base", "unknown options: bogus_option", "learning_rate = 'fast' is not a number",
                 "max_token_length must be 75, 150 or 225", "algo", "validation_split: comes with"):
        assert part in msg, (part, msg)


def test_train_help_lists_every_kohya_option():
    from lora_ext.cli import build_parser

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    taken = {s[2:] for a in train._actions for s in a.option_strings if s.startswith("--")}
    assert set(k.KOHYA_DEFAULTS) <= taken
    text = train.format_help()
    assert "--fp8_base" in text and "does not do this yet" in text and "old spelling of --optimizer_type" in text


def test_the_cli_reads_kohyas_other_options_as_flags_values_and_lists(tmp_path):
    from lora_ext.cli import _train_values, build_parser

    args, extra = build_parser().parse_known_args(
        ["train", "--use_8bit_adam", "--loss_type", "l2", "--base_weights", "a.safetensors", "b.safetensors"])
    values = _train_values(args, extra)
    assert values["use_8bit_adam"] is True and values["loss_type"] == "l2"
    assert values["base_weights"] == ["a.safetensors", "b.safetensors"]


def test_the_table_is_kohyas_own_where_a_checkout_is_given():
    """Against kohya's argument parser itself (LORA_EXT_KOHYA: a checkout of sd-scripts v0.10.1;
    LORA_EXT_KOHYA_PYTHON: a python that imports it): the same 193 names, the same defaults."""
    folder, python = os.environ.get("LORA_EXT_KOHYA"), os.environ.get("LORA_EXT_KOHYA_PYTHON")
    if not folder or not python:
        pytest.skip("set LORA_EXT_KOHYA (sd-scripts v0.10.1) and LORA_EXT_KOHYA_PYTHON to compare with kohya's parser")
    code = ("import json, train_network; p = train_network.setup_parser(); print(json.dumps({a.dest: a.default "
            "for a in p._actions if a.option_strings and a.dest != 'help'}, default=str))")
    out = subprocess.run([python, "-c", code], cwd=folder, capture_output=True, text=True, check=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(theirs) == set(k.KOHYA_DEFAULTS)
    for name, default in theirs.items():
        ours = k.KOHYA_DEFAULTS[name]
        assert default == ours or (isinstance(ours, bool) and default in (None, False) and not ours), name


@pytest.mark.parametrize("given,total,steps", [(5, 100, 5), ("5", 100, 5), (0.1, 100, 10), ("0.1", 250, 25),
                                               ("10%", 100, 10), (0, 100, 0), (0.05, 30, 1), ("1", 100, 1)])
def test_a_warmup_below_one_is_a_share_of_the_runs_steps_as_in_kohya(given, total, steps):
    """kohya's int_or_float, then int(share * total steps) (train_util.get_scheduler_fix)."""
    cfg = from_dict({"lr_warmup_steps": given})
    assert cfg.warmup_steps(total) == steps


@pytest.mark.parametrize("given", ["1.5", "-0.1", "nan", "fast"])
def test_a_warmup_that_is_neither_steps_nor_a_share_is_named(given):
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        from_dict({"lr_warmup_steps": given})


def test_a_run_warms_up_over_its_share_of_steps():
    from lora_ext.train.schedules import lr_factor

    cfg = from_dict({"lr_warmup_steps": 0.25, "lr_scheduler": "constant_with_warmup"})
    factors = [lr_factor(cfg.lr_scheduler, s, 8, cfg.warmup_steps(8)) for s in range(8)]
    assert factors[:2] == [lr_factor("constant_with_warmup", s, 8, 2) for s in range(2)] and factors[2:] == [1.0] * 6
    assert factors[0] < 1.0


def test_kohyas_metadata_options_are_written_into_the_model_spec(data, tmp_path):
    """--metadata_*: modelspec.<name> in the saved file, the title instead of output_name, a thumbnail file
    as a data URL (as kohya's sai_model_spec writes them)."""
    import base64

    from PIL import Image

    from conftest import tiny_model
    from lora_ext import files
    from lora_ext.hosts import for_model
    from lora_ext.train.loop import train
    from test_train import _cfg

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "thumb.png")
    given = {"metadata_title": "My character", "metadata_author": "me", "metadata_tags": "a, b",
             "metadata_trigger_phrase": "mychar", "metadata_thumbnail": str(tmp_path / "thumb.png")}
    assert from_dict(given).metadata_author == "me"
    cfg = _cfg(data, tmp_path / "out", max_train_steps=1, **given)
    meta = files.read(train(for_model(tiny_model("sd1")), cfg).lora_path).metadata
    assert meta["modelspec.title"] == "My character" and meta["modelspec.author"] == "me"
    assert meta["modelspec.tags"] == "a, b" and meta["modelspec.trigger_phrase"] == "mychar"
    assert "modelspec.license" not in meta
    kind, encoded = meta["modelspec.thumbnail"].split(";base64,")
    assert kind == "data:image/png" and base64.b64decode(encoded) == (tmp_path / "thumb.png").read_bytes()
    with pytest.raises(ConfigError, match="metadata_thumbnail"):
        from_dict({"metadata_thumbnail": str(tmp_path / "none.png")})


@pytest.mark.parametrize("given,problem", [
    ({"optimizer_type": "Bogus"}, "unknown optimizer_type 'Bogus'"),
    ({"optimizer_args": ["weight_decay"]}, "optimizer_args 'weight_decay' is not key=value"),
    ({"optimizer_args": ["foo=1"]}, "unexpected keyword argument 'foo'"),
    ({"lr_scheduler": "inverse_sqrt"}, "lr_scheduler 'inverse_sqrt': one of")])
def test_the_optimizer_and_schedule_are_checked_before_any_model_loads(given, problem):
    with pytest.raises(ConfigError, match=problem):
        from_dict(given)
    assert from_dict({"optimizer_type": "", "optimizer_args": ["betas=0.9,0.99", "weight_decay=0.1"]})
