"""The kohya_ss GUI's configuration JSON (its LoRA tab's saved file and shared presets), and kohya's optimizers
by name."""
import json
import math
import os

import pytest
import torch

from lora_ext.train import kohya_gui, optim
from lora_ext.train.config import ConfigError, from_dict
from lora_ext.train.kohya_options import OPTIMIZER_NAMES


def _gui_file(**changes) -> dict:
    """A LoRA-tab configuration in the GUI's layout: every field of its form, most at their defaults, the
    numbers partly as text, as the GUI saves them."""
    data = {
        "LoRA_type": "LyCORIS/LoCon", "LyCORIS_preset": "full", "adaptive_noise_scale": 0, "additional_parameters": "",
        "block_alphas": "", "block_dims": "", "block_lr_zero_threshold": "", "bucket_no_upscale": True,
        "bucket_reso_steps": 64, "cache_latents": True, "cache_latents_to_disk": False,
        "caption_dropout_every_n_epochs": 0.0, "caption_dropout_rate": 0, "caption_extension": ".txt",
        "clip_skip": "1", "color_aug": False, "constrain": 0.0, "conv_alpha": 1, "conv_block_alphas": "",
        "conv_block_dims": "", "conv_dim": 4, "decompose_both": False, "dim_from_weights": False,
        "down_lr_weight": "", "enable_bucket": True, "epoch": 2, "factor": -1, "flip_aug": False,
        "full_bf16": False, "full_fp16": False, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
        "keep_tokens": "0", "learning_rate": 0.0001, "logging_dir": "", "lora_network_weights": "",
        "lr_scheduler": "cosine", "lr_scheduler_num_cycles": "", "lr_scheduler_power": "", "lr_warmup": 10,
        "max_bucket_reso": 2048, "max_data_loader_n_workers": "0", "max_resolution": "64,64",
        "max_timestep": 1000, "max_token_length": "75", "max_train_epochs": "", "max_train_steps": "",
        "mem_eff_attn": False, "mid_lr_weight": "", "min_bucket_reso": 64, "min_snr_gamma": 0,
        "min_timestep": 0, "mixed_precision": "no", "model_list": "custom", "module_dropout": 0,
        "multires_noise_discount": 0.3, "multires_noise_iterations": 0, "network_alpha": 2, "network_dim": 4,
        "network_dropout": 0, "noise_offset": 0.05, "noise_offset_type": "Original", "num_cpu_threads_per_process": 2,
        "optimizer": "AdamW", "optimizer_args": "", "output_dir": "out", "output_name": "gui", "persistent_data_loader_workers": False,
        "pretrained_model_name_or_path": "tiny-sd1", "prior_loss_weight": 1.0, "random_crop": False,
        "rank_dropout": 0, "rank_dropout_scale": False, "reg_data_dir": "", "rescaled": False, "sample_every_n_epochs": 0,
        "sample_every_n_steps": 0, "sample_prompts": "", "sample_sampler": "euler_a", "save_every_n_epochs": 1,
        "save_model_as": "safetensors", "save_precision": "fp16", "scale_weight_norms": 0, "sdxl": False,
        "seed": "1234", "shuffle_caption": False, "stop_text_encoder_training": 0, "text_encoder_lr": "5e-05",
        "train_batch_size": 2, "train_data_dir": "", "train_norm": False, "train_on_input": True,
        "training_comment": "", "unet_lr": "0.0001", "unit": 1, "up_lr_weight": "", "use_cp": False,
        "use_scalar": False, "use_tucker": False, "bypass_mode": False, "dora_wd": False, "v2": False,
        "v_parameterization": False, "vae_batch_size": 0, "xformers": "xformers",
    }
    data.update(changes)
    return data


def test_a_gui_file_becomes_kohyas_options_as_the_gui_sends_them():
    options, notes = kohya_gui.options(_gui_file())
    assert options["network_module"] == "lycoris.kohya"
    args = dict(a.split("=", 1) for a in options["network_args"])
    assert (args["algo"], args["conv_dim"], args["conv_alpha"], args["use_scalar"]) == ("locon", "4", "1", "False")
    assert options["resolution"] == "64,64" and options["optimizer_type"] == "AdamW"
    assert options["max_train_epochs"] == 2 and options["lr_warmup_steps"] == pytest.approx(0.1)
    assert (options["text_encoder_lr"], options["unet_lr"], options["seed"]) == (5e-5, 1e-4, 1234)
    assert options["xformers"] is True and options["noise_offset"] == 0.05
    assert "multires_noise_discount" not in options          # the Original noise offset was chosen
    for absent in ("color_aug", "caption_dropout_rate", "min_snr_gamma", "train_on_input", "unit", "model_list"):
        assert absent not in options, absent
    assert any(n.startswith("num_cpu_threads_per_process: not taken") for n in notes)
    cfg = from_dict(options)
    assert (cfg.max_train_epochs, cfg.warmup_steps(100), cfg.network_train_unet_only) == (2, 10, False)


@pytest.mark.parametrize("te,unet,only", [("0", "0.0001", "unet"), ("5e-05", 0, "te"), ("", "1e-4", "unet")])
def test_a_zero_learning_rate_trains_only_the_other_part_as_the_gui_does(te, unet, only):
    options, _ = kohya_gui.options(_gui_file(text_encoder_lr=te, unet_lr=unet))
    cfg = from_dict(options)
    assert (cfg.network_train_unet_only, cfg.network_train_text_encoder_only) == (only == "unet", only == "te")


def test_the_gui_extras_and_length_rules():
    options, notes = kohya_gui.options(_gui_file(
        LoRA_type="Standard", additional_parameters='--log_prefix=xl --max_grad_norm 0.5 --network_args "dropout=0.1"',
        max_train_steps="300", epoch=5, seed="0", noise_offset_type="Multires", multires_noise_iterations=6))
    assert options["network_module"] == "networks.lora"
    assert from_dict(options).network_args == ["dropout=0.1"]       # the command line's, as in kohya
    assert (options["log_prefix"], options["max_grad_norm"], options["max_train_steps"]) == ("xl", "0.5", 300)
    assert "max_train_epochs" not in options and "noise_offset" not in options
    assert options["multires_noise_iterations"] == 6 and options["lr_scheduler_num_cycles"] == 5
    assert any("seed: 0" in n for n in notes)
    kohya_lora = dict(a.split("=", 1) for a in kohya_gui.options(_gui_file(LoRA_type="Kohya LoCon"))[0]["network_args"])
    assert kohya_lora == {"conv_dim": "4", "conv_alpha": "1"}


def test_what_is_not_a_gui_file_is_said():
    with pytest.raises(kohya_gui.GuiConfigError, match="not valid JSON"):
        kohya_gui.read("{")
    with pytest.raises(kohya_gui.GuiConfigError, match="not a kohya_ss GUI"):
        kohya_gui.read(json.dumps({"learning_rate": 1}))


def test_a_gui_file_trains_from_the_command_line_and_its_notes_are_printed(tmp_path):
    from test_train import _cli

    from lora_ext import files
    from lora_ext.sample_data import make_sample_dataset

    data = make_sample_dataset(str(tmp_path / "data"), size=64)
    path = tmp_path / "gui.json"
    path.write_text(json.dumps(_gui_file(train_data_dir=data["train"], max_train_steps="2")), encoding="utf-8")
    out = _cli("train", "--config", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "num_cpu_threads_per_process: not taken" in out.stderr
    meta = files.read(str(tmp_path / "out" / "gui.safetensors")).metadata
    assert json.loads(meta["ss_network_args"])["algo"] == "locon" and meta["ss_network_dim"] == "4"


def test_the_train_tab_loads_a_gui_file_put_among_its_presets(tmp_path):
    from lora_ext.ui import train_fields as tf
    from lora_ext.ui.train_tab import list_presets, load_preset

    (tmp_path / "from_gui.json").write_text(json.dumps(_gui_file()), encoding="utf-8")
    assert list_presets(str(tmp_path)) == ["from_gui"]
    values, message = load_preset(str(tmp_path), "from_gui")
    assert values is not None and "not taken" in message
    assert dict(zip([f.name for f in tf.FIELDS], values))["network_dim"] == 4


def test_every_kohya_optimizer_name_is_built_or_names_what_it_needs():
    for name in OPTIMIZER_NAMES:
        messages = []
        try:
            opt = optim.make_optimizer(name, [{"params": [torch.zeros(2, requires_grad=True)], "lr": 1e-3}], [], messages)
        except ValueError as e:
            assert "needs the package" in str(e) and "pip install" in str(e), name
            continue
        assert isinstance(opt, torch.optim.Optimizer), name
        if "8bit" in name.lower() or "paged" in name.lower():
            assert messages and "bitsandbytes" in messages[0]
    sgd = optim.make_optimizer("SGDNesterov", [{"params": [torch.zeros(1, requires_grad=True)], "lr": 1}], [], [])
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9        # kohya's default momentum
    assert optim.problems("torch.optim.RAdam", ["weight_decay=0.1"]) == []
    assert "not a torch optimizer" in optim.problems("os.path", [])[0]
    assert "no package" in optim.problems("notapackage.Opt", [])[0]


def test_adafactor_as_kohya_runs_it(tmp_path):
    """Relative step (kohya's default): Adafactor sets its own learning rate, the schedule is not used; with
    relative_step=False it is an optimizer at the given rate."""
    p = torch.nn.Parameter(torch.ones(4, 4))
    messages = []
    opt = optim.make_optimizer("Adafactor", [{"params": [p], "lr": 1e-3}], [], messages)
    assert opt.param_groups[0]["lr"] is None and "sets its own learning rate" in messages[0]
    p.grad = torch.ones_like(p)
    opt.step()
    assert 0 < optim.current_lr(opt) <= 1e-2 and not torch.equal(p, torch.ones(4, 4))
    fixed = optim.make_optimizer("Adafactor", [{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1e-3}],
                                 ["relative_step=False", "scale_parameter=False", "warmup_init=False"], [])
    assert optim.current_lr(fixed) == 1e-3
    with pytest.raises(ConfigError, match="lr_scheduler adafactor"):
        from_dict({"lr_scheduler": "adafactor", "optimizer_type": "AdamW"})
    cfg = from_dict({"lr_scheduler": "adafactor", "optimizer_type": "Adafactor"})
    from lora_ext.train.schedules import lr_factor
    assert lr_factor(cfg.lr_scheduler, 50, 100) == 1.0


def test_gui_presets_of_a_kohya_ss_checkout_read_with_a_message_each():
    """With LORA_EXT_KOHYA_SS (a bmaltais/kohya_ss checkout): each of its LoRA presets is read, and either
    gives a configuration or one message naming what lora_ext does not do."""
    root = os.environ.get("LORA_EXT_KOHYA_SS")
    if not root:
        pytest.skip("set LORA_EXT_KOHYA_SS to a kohya_ss checkout to read its presets")
    folder = os.path.join(root, "presets", "lora")
    ok = 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            options, _ = kohya_gui.read(f.read())
        try:
            from_dict({**options, "train_data_dir": "x"})
            ok += 1
        except ConfigError as e:
            assert "unknown option" not in str(e), (name, str(e))
    assert ok > 0 and math.isfinite(ok)

