"""kohya's train_network.py options (train.kohya_options): every one of them is lora_ext's, an old spelling,
without effect, read only beside another, or refused with a reason; given at kohya's default each is accepted;
every problem of a configuration comes out in one message."""
import importlib.util
import json
import math
import os
import subprocess

import pytest
import torch

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
           "log_tracker_name": "", "metadata_title": "", "caption_separator": ",", "noise_offset_random_strength": False,
           "multires_noise_discount": 0.3, "validation_seed": 0, "max_data_loader_n_workers": 0}
    cfg = from_dict(gui)
    assert cfg == TrainConfig()
    lines = notes(gui)
    assert any("sample_sampler" in n and "DDIM" in n for n in lines)
    assert not any("loss_type" in n or "huber" in n for n in lines)


def test_an_option_read_only_beside_another_is_judged_when_that_one_is_given():
    assert from_dict({"validation_seed": 5, "wandb_run_name": "run", "zero_stage": 3}) == TrainConfig()
    with pytest.raises(ConfigError, match="validation_split: comes with"):
        from_dict({"validation_split": 0.1, "validation_seed": 5})
    with pytest.raises(ConfigError, match="deepspeed: DeepSpeed is not used"):
        from_dict({"deepspeed": True, "zero_stage": 3})


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
    given = {"loss_type": "l3", "fp8_base": True, "bogus_option": 1, "learning_rate": "fast",
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


def test_kohyas_metadata_options_are_written_into_the_model_spec(data, tmp_path):  # noqa: F811
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
    ({"lr_scheduler": "piecewise_constant"}, "lr_scheduler 'piecewise_constant': one of")])
def test_the_optimizer_and_schedule_are_checked_before_any_model_loads(given, problem):
    with pytest.raises(ConfigError, match=problem):
        from_dict(given)
    assert from_dict({"optimizer_type": "", "optimizer_args": ["betas=0.9,0.99", "weight_decay=0.1"]})


def _kohya_caption(caption: str, prefix: str, suffix: str) -> str:
    """kohya's read_caption and process_caption without dropout, wildcards or shuffling (train_util), written
    from their description: the caption file's first line (without wildcards kohya reads no other), then the
    prefix and suffix joined with a space."""
    caption = caption.split("\n")[0]
    if prefix:
        caption = prefix + " " + caption
    if suffix:
        caption = caption + " " + suffix
    return caption.split("\n")[0]


@pytest.mark.parametrize("caption", ["a cat, sitting", "", "first line, tags\nsecond line"])
@pytest.mark.parametrize("prefix,suffix", [("", ""), ("mychar", ""), ("", "masterpiece"), ("mychar,", "best")])
def test_caption_prefix_suffix_and_the_first_line_as_kohya(caption, prefix, suffix):
    import random

    from lora_ext.train.batches import Augment, caption_of
    from lora_ext.train.captions import process

    rules = from_dict({"caption_prefix": prefix, "caption_suffix": suffix})
    assert process(caption, random.Random(0), rules) == _kohya_caption(caption, prefix, suffix)
    sample = type("S", (), {"item": type("I", (), {"caption": caption, "options": None})(), "seed": 3, "epoch": 0})()
    assert caption_of(sample, Augment(caption=rules)) == _kohya_caption(caption, prefix, suffix)


def _rules(**options):
    return from_dict(options)


def test_keep_tokens_separator_keeps_a_head_and_a_tail_and_shuffles_between():
    import random

    from lora_ext.train.captions import process

    rules = _rules(shuffle_caption=True, keep_tokens_separator="|||")
    cap = "mychar, red hair ||| smile, night, outdoors, hat ||| masterpiece, best"
    outs = {process(cap, random.Random(s), rules) for s in range(40)}
    assert len(outs) > 3
    for o in outs:
        tags = o.split(", ")
        assert tags[:2] == ["mychar", "red hair"] and tags[-2:] == ["masterpiece", "best"]
        assert sorted(tags[2:-2]) == sorted(["smile", "night", "outdoors", "hat"])


def test_caption_separator_secondary_separator_and_tag_dropout():
    import random

    from lora_ext.train.captions import process

    # kohya splits at the separator and joins with ", "; the secondary separator becomes the separator after
    assert process("a;b;c", random.Random(0), _rules(caption_separator=";", shuffle_caption=True,
                                                      keep_tokens=3)) == "a, b, c"
    assert process("a, b$$c", random.Random(0), _rules(secondary_separator="$$")) == "a, b,c"
    rules = _rules(caption_tag_dropout_rate=0.5, keep_tokens=1)
    outs = [process("k, t1, t2, t3, t4, t5, t6", random.Random(s), rules) for s in range(200)]
    assert all(o.startswith("k") for o in outs)
    kept = sum(len(o.split(", ")) - 1 for o in outs) / (6 * len(outs))
    assert 0.4 < kept < 0.6                     # each tag after keep_tokens kept with probability 0.5
    assert process("a, b", random.Random(0), _rules(caption_tag_dropout_rate=1.0, keep_tokens=1)) == "a"


def test_wildcards_pick_one_choice_and_one_line():
    import random

    from lora_ext.train.captions import process

    rules = _rules(enable_wildcard=True)
    outs = {process("a {red|blue|green} cat {{braces}}", random.Random(s), rules) for s in range(60)}
    assert outs == {f"a {c} cat {{braces}}" for c in ("red", "blue", "green")}
    assert {process("one\ntwo", random.Random(s), rules) for s in range(40)} == {"one", "two"}
    assert process("one\ntwo", random.Random(0), _rules()) == "one"


def test_captions_that_change_from_step_to_step_cannot_be_cached():
    for option in ({"caption_tag_dropout_rate": 0.1}, {"enable_wildcard": True}):
        with pytest.raises(ConfigError, match="cache_text_encoder_outputs keeps one encoding per caption"):
            from_dict({"cache_text_encoder_outputs": True, "network_train_unet_only": True, **option})
    with pytest.raises(ConfigError, match="caption_separator is empty"):
        from_dict({"caption_separator": ""})


# --- kohya's noise and loss options (train.losses), against kohya's formulas written out here ---------------

def _ac():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def _kohya_huber_c(schedule, c, scale, t, ac):
    if schedule == "exponential":
        alpha = -math.log(c) / 1000
        return torch.exp(-alpha * t.float()) * scale
    if schedule == "snr":
        a = ac[t]
        return (1 - c) / (1 + ((1 - a) / a) ** 0.5) ** 2 + c
    return torch.full(t.shape, c * scale)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["snr", "exponential", "constant"])
def test_each_loss_type_and_huber_schedule_is_kohyas(loss_type, schedule):
    from lora_ext.train import losses

    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, ac = torch.tensor([0, 400, 999]), _ac()
    cfg = from_dict({"loss_type": loss_type, "huber_schedule": schedule, "huber_c": 0.2, "huber_scale": 1.5})
    ours = losses.elementwise(pred, target, loss_type, losses.huber_threshold(cfg, t, ac))
    c = _kohya_huber_c(schedule, 0.2, 1.5, t, ac).view(-1, 1, 1, 1)
    want = {"l2": (pred - target) ** 2, "l1": (pred - target).abs(),
            "huber": 2 * c * (torch.sqrt((pred - target) ** 2 + c ** 2) - c),
            "smooth_l1": 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)}[loss_type]
    torch.testing.assert_close(ours, want)


@pytest.mark.parametrize("v", [False, True])
@pytest.mark.parametrize("options", [{"min_snr_gamma": 5}, {"scale_v_pred_loss_like_noise_pred": True},
                                     {"v_pred_like_loss": 0.3}, {"debiased_estimation_loss": True},
                                     {"min_snr_gamma": 3, "debiased_estimation_loss": True, "v_pred_like_loss": 0.2}])
def test_the_snr_weights_are_kohyas_in_its_order(options, v):
    from lora_ext.train import losses

    ac, t = _ac(), torch.tensor([0, 10, 500, 999])
    loss = torch.tensor([1.0, 2.0, 0.5, 0.25])
    snr = ac[t] / (1 - ac[t])
    want = loss.clone()
    if options.get("min_snr_gamma"):
        g = torch.minimum(snr, torch.full_like(snr, options["min_snr_gamma"]))
        want = want * (g / (snr + 1) if v else g / snr)
    capped = torch.minimum(snr, torch.full_like(snr, 1000))
    if options.get("scale_v_pred_loss_like_noise_pred"):
        want = want * capped / (capped + 1)
    if options.get("v_pred_like_loss"):
        want = want + want / (capped / (capped + 1)) * options["v_pred_like_loss"]
    if options.get("debiased_estimation_loss"):
        want = want * (1 / (capped + 1) if v else 1 / torch.sqrt(capped))
    cfg = TrainConfig(**options)
    torch.testing.assert_close(losses.snr_weighted(loss, ac[t], cfg, v), want)


def test_noise_offset_adaptive_and_random_strength_are_kohyas():
    from lora_ext.train import losses

    latent = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(4))
    cfg = TrainConfig(noise_offset=0.1, adaptive_noise_scale=0.05)
    ours = losses.offset_noise(noise, torch.Generator().manual_seed(5), cfg, latent.mean(dim=(1, 2)))
    g = torch.Generator().manual_seed(5)
    offset = (0.1 + 0.05 * latent.mean(dim=(1, 2), keepdim=True).abs()).clamp_min(0)
    torch.testing.assert_close(ours, noise + offset * torch.randn(4, 1, 1, generator=g))
    cfg = TrainConfig(noise_offset=0.1, noise_offset_random_strength=True)
    ours = losses.offset_noise(noise, torch.Generator().manual_seed(5), cfg)
    g = torch.Generator().manual_seed(5)
    strength = torch.rand(1, generator=g).item() * 0.1
    torch.testing.assert_close(ours, noise + strength * torch.randn(4, 1, 1, generator=g))


def _kohya_pyramid(noise, draw, iterations, discount):
    """kohya's pyramid_noise_like on one sample (its batch of 1), its random draws from `draw`."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = draw.rand() * 2 + 2
        wn, hn = max(1, int(w / (r ** i))), max(1, int(h / (r ** i)))
        noise = noise + u(draw.randn(b, c, wn, hn)) * discount ** i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize("size,iterations,discount", [((4, 32, 32), 6, 0.3), ((4, 16, 24), 10, 0.8), ((4, 8, 8), 1, 0.5)])
def test_pyramid_noise_is_kohyas(size, iterations, discount):
    from lora_ext.train import losses

    class Draws:        # the same generator, drawn in the same order as ours
        def __init__(self):
            self.g = torch.Generator().manual_seed(1)

        def rand(self):
            return torch.rand(1, generator=self.g).item()

        def randn(self, *shape):
            return torch.randn(shape, generator=self.g)

    noise = torch.randn(size, generator=torch.Generator().manual_seed(0))
    ours = losses.pyramid(noise, torch.Generator().manual_seed(1), iterations, discount)
    torch.testing.assert_close(ours, _kohya_pyramid(noise[None], Draws(), iterations, discount)[0])
    assert abs(ours.std().item() - 1) < 1e-5


def test_input_perturbation_goes_to_the_noisy_latents_only(tmp_path):
    """ip_noise_gamma: the model sees latents noised with noise + gamma * more noise, the target is the noise."""
    from lora_ext.train import losses

    noise = torch.zeros(4, 8, 8)
    assert torch.equal(losses.perturbation(noise, torch.Generator().manual_seed(0), TrainConfig()), noise)
    extra = losses.perturbation(noise, torch.Generator().manual_seed(0), TrainConfig(ip_noise_gamma=0.1))
    torch.testing.assert_close(extra, 0.1 * torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0)))


def test_the_noise_and_loss_options_are_checked():
    for given, problem in (({"loss_type": "l3"}, "loss_type 'l3'"), ({"huber_schedule": "x"}, "huber_schedule"),
                           ({"adaptive_noise_scale": 0.1}, "give noise_offset too"),
                           ({"v_pred_like_loss": 0.1, "v_parameterization": True}, "not with v_parameterization"),
                           ({"huber_c": 0}, "huber_c")):
        with pytest.raises(ConfigError, match=problem):
            from_dict(given)
    assert from_dict({"noise_offset": 0.05, "adaptive_noise_scale": -0.01}).adaptive_noise_scale == -0.01


def test_a_run_with_kohyas_noise_and_loss_options_trains_and_records_them(data, tmp_path):  # noqa: F811
    from conftest import tiny_model
    from lora_ext import files
    from lora_ext.hosts import for_model
    from lora_ext.train.loop import train
    from test_train import _cfg

    options = dict(loss_type="huber", huber_schedule="exponential", multires_noise_iterations=4, ip_noise_gamma=0.1,
                   noise_offset=0.05, adaptive_noise_scale=0.01, debiased_estimation_loss=True, max_train_steps=3)
    plain = train(for_model(tiny_model("sd1")), _cfg(data, tmp_path / "a", max_train_steps=3))
    result = train(for_model(tiny_model("sd1")), _cfg(data, tmp_path / "b", **options))
    assert all(math.isfinite(x) for x in result.losses) and result.losses != plain.losses
    meta = files.read(result.lora_path).metadata
    assert meta["ss_loss_type"] == "huber" and meta["ss_huber_schedule"] == "exponential"
    assert meta["ss_multires_noise_iterations"] == "4" and meta["ss_debiased_estimation"] == "True"
