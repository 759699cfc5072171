"""python -m lora_ext {demo,inspect,...}: the headless front door. Thin: parses arguments and calls the
library; bad input exits with code 2 and a message, never a traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys


class UsageError(Exception):
    """Bad input from the command line; printed without a traceback, exit code 2."""


def cmd_inspect(args) -> int:
    from .tools.describe import describe

    arch = _arch_of(args.model) if args.model else None
    report = describe(args.file, arch)
    print(json.dumps(report, indent=2, sort_keys=False))
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    # a part none of whose modules fits would not be applied at all: not a usable file for this model
    return 2 if any("none of them" in w for w in report["warnings"]) else 0


def _arch_of(name: str):
    from . import naming

    if name in naming.STANDARD:
        return naming.STANDARD[name]
    if name.startswith("tiny-"):
        from . import tiny
        return naming.arch_from_model(tiny.build(name.removeprefix("tiny-")))
    raise UsageError(f"--model {name!r}: give sd1, sd2, sdxl, or tiny-sd1/tiny-sd2/tiny-sdxl")


def _train_values(args, extra: list) -> dict:
    """Options from the configuration file (if any: kohya's TOML or the kohya_ss GUI's JSON, whose fields
    not taken are said here), then the flags given (kohya's names), as one dict."""
    from .train import config, kohya_options

    values = {}
    if args.config_file:
        found, notes = config.load_config_dict(args.config_file)
        for line in notes:
            print(f"note: {args.config_file}: {line}", file=sys.stderr)
        values.update(found)
    names = [a[2:].split("=")[0] for a in extra if a.startswith("--")]
    if extra and not names:
        raise UsageError(f"unexpected arguments: {' '.join(extra)} (options are --name value)")
    values.update({name: None for name in names})      # from_dict names them, with any unsupported ones
    own = config.field_names()
    for name, value in vars(args).items():
        if name == "config_file" or value is None:
            continue
        if name in own:
            values[name] = value
        elif name in kohya_options.KOHYA_DEFAULTS:     # kohya's other options: a flag, a value or several
            values[name] = True if value == [] else value[0] if len(value) == 1 else value
    return values


def own_vae(host, path: str) -> None:
    """kohya's --vae: the file's VAE into the headless run's model (ldm or diffusers layout), marked on the
    host for the run (train.loop checks it)."""
    from .hosts.vae_file import load_into

    load_into(host.vae, path)
    host.vae_file = path


def _host_for(name: str, mixed_precision: str = "no", frozen_weights: str = "fp32", unet_later: bool = False):
    """The host of a headless run, on the device it runs on (the process's GPU when there is one). Its
    frozen UNet and text-encoder weights are loaded straight in the dtype the run holds them in
    (train.optim.frozen_storage): under mixed precision its dtype, what the run would cast them to anyway,
    without a full-precision copy first (nothing of this model is put back afterwards: the process ends); on a
    CPU that computes in fp32, the asked-for half dtype all the same, or with frozen_weights "as_stored" the
    file's own, cast up at use. `unet_later`: a single file's UNet weights are read only when the run asks
    (train.leaving.unet_after_encoders). The host is the process's own (disposable): a run may free what it no
    longer needs of it."""
    from .hosts.checkpoint import load_checkpoint
    from .hosts import for_model
    from .train.distributed import local_device
    from .train.optim import autocast_dtype, frozen_storage

    if not name:
        raise UsageError("--pretrained_model_name_or_path is required (a .safetensors/.ckpt checkpoint or a "
                         "diffusers folder)")
    device = local_device()
    if name.startswith("tiny-"):
        from . import tiny
        host = for_model(tiny.build(name.removeprefix("tiny-")))
    elif os.path.isdir(name):
        from .hosts.diffusers_host import DiffusersHost
        if frozen_weights == "as_stored" and frozen_storage(mixed_precision, device, frozen_weights):
            print("note: --frozen_weights as_stored applies to a single-file checkpoint; a diffusers folder's "
                  "frozen weights are held in fp32", file=sys.stderr)
        host = DiffusersHost(name)
    else:
        dtype_for = frozen_storage(mixed_precision, device, frozen_weights)
        at_use = autocast_dtype(mixed_precision, device, []) is None     # train.upcast casts them up
        host = for_model(load_checkpoint(name, hold=dtype_for and (lambda model: _held(model, at_use), dtype_for),
                                         later=(lambda model: [for_model(model).unet]) if unet_later else None))
    host.model.to(device)
    host.disposable = True
    return host


def _held(model, at_use: bool) -> list:
    """The frozen weights a headless run loads in the dtype it holds them in: the UNet's and text encoders'
    Linear / Conv2d weights (cast up at use: those a layer's own forward reads); computing in fp32 from narrow
    weights, the token embedding tables too (a lookup needs no cast)."""
    from .hosts import for_model
    from .train.session import frozen_roots, layer_parameters
    from .train.upcast import token_embeddings

    roots = frozen_roots(for_model(model))
    return list(layer_parameters(roots, at_use)) + (token_embeddings(roots) if at_use else [])


class _StopOnSignal:
    """SIGINT / SIGTERM during training: finish the step, save the LoRA and the state, exit. A second Ctrl-C
    quits at once (what the last save holds is kept)."""

    def __init__(self):
        import signal

        self.signal, self.asked = signal, None
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.asked is not None:
            raise KeyboardInterrupt
        self.asked = self.signal.Signals(signum).name
        print(f"\n{self.asked}: stopping after this step, saving the LoRA and a state to resume from "
              "(Ctrl-C again quits now)", file=sys.stderr)

    def __call__(self) -> bool:
        return self.asked is not None

    def restore(self) -> None:
        for s, old in self.old.items():
            self.signal.signal(s, old)


def cmd_train(args, extra) -> int:
    from .hosts.checkpoint import CheckpointError
    from .train import config, network_args
    from .train.dataset import DatasetError
    from .train.dataset_config import scan_run
    from .train.distributed import local_device
    from .train.leaving import unet_after_encoders
    from .train.loop import train
    from .train.outputs import check_outputs
    from .train.progress import TensorBoardLog, TqdmProgress, fan_out
    from .train.state import StateError

    if args.output_config:
        return _output_config(args, extra)
    values = _train_values(args, extra)
    try:
        cfg = config.from_dict(values, "options")
        for line in config.notes(values):
            print(line, file=sys.stderr)
        # what can be found wrong without the model is found before minutes of loading it
        name = cfg.pretrained_model_name_or_path
        if name and not name.startswith("tiny-") and not os.path.exists(name):
            raise UsageError(f"{name}: no such checkpoint file or diffusers folder")
        check_outputs(cfg)
        data = scan_run(cfg)
        host = _host_for(cfg.pretrained_model_name_or_path, cfg.mixed_precision, cfg.frozen_weights,
                         unet_after_encoders(cfg, local_device(), network_args.spec(cfg)))
        if cfg.vae:
            own_vae(host, cfg.vae)
        from .train import memory
        est, line = memory.estimated(host, cfg)
        print(f"estimated memory: {line}", file=sys.stderr)
        subscribers = [TqdmProgress()]
        if cfg.logging_dir:
            subscribers.append(TensorBoardLog(cfg.logging_dir))
        stop = _StopOnSignal()
        try:
            result = train(host, cfg, on_event=fan_out(*subscribers), should_stop=stop, scan=data, estimate=est)
        finally:
            stop.restore()
    except (config.ConfigError, CheckpointError, DatasetError, StateError, ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    print(json.dumps({"lora": result.lora_path, "state": result.state_path, "steps": result.steps,
                      "cancelled": result.cancelled, "final_loss": result.losses[-1] if result.losses else None,
                      "messages": result.messages}, indent=2))
    if result.cancelled:
        print(f"stopped at step {result.steps}; to continue, run the same command with --resume "
              f"{result.state_path}", file=sys.stderr)
        return 130 if stop.asked == "SIGINT" else 143
    return 0


def _output_config(args, extra: list) -> int:
    """kohya's --output_config: the options given on the command line, checked, written as TOML to the
    --config_file path (.toml added where it has no extension), never over an existing file; nothing is trained."""
    from .atomic import atomic_write
    from .train import config

    if not args.config_file:
        raise UsageError("--output_config writes the options to --config_file: give its path")
    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    if os.path.exists(path):
        raise UsageError(f"{path} exists: --output_config does not overwrite a file (kohya neither)")
    config_file, args.config_file, args.output_config = args.config_file, None, None
    values = {k: v for k, v in _train_values(args, extra).items() if v is not None and k != "wandb_api_key"}
    try:
        config.from_dict(values, "options")
    except config.ConfigError as e:
        raise UsageError(str(e)) from None
    lines = [f"{k} = {str(v).lower() if isinstance(v, bool) else json.dumps(v)}" for k, v in sorted(values.items())]
    atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))
    print(f"wrote {path} ({len(values)} options); train with --config {config_file}", file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    from .tools.lora_tools import parse_lora_arg
    from .merge import Item, MergeError, merge_checkpoint

    items = [Item(*parse_lora_arg(s)) for s in args.lora]
    precision = None if args.precision == "keep" else args.precision
    try:
        report = merge_checkpoint(args.model, items, args.out, precision, args.overwrite)
    except MergeError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(report, indent=2))
    return 0


def cmd_resize(args) -> int:
    from .tools.lora_tools import resize_file

    if (args.rank is None) == (args.energy is None):
        raise UsageError("give --rank R or --energy F (0 < F <= 1)")
    report = resize_file(args.lora, args.out, args.rank, args.energy, args.precision, args.overwrite)
    if not args.verbose:
        report["per_module"] = None
    print(json.dumps(report, indent=2))
    return 0


def cmd_merge_loras(args) -> int:
    from .tools.lora_tools import merge_lora_files, parse_lora_arg

    items = [parse_lora_arg(text)[:2] for text in args.lora]
    report = merge_lora_files(items, args.out, args.rank, args.precision, args.overwrite)
    report.pop("per_module")
    print(json.dumps(report, indent=2))
    return 0


def cmd_extract(args) -> int:
    from .tools.lora_tools import extract_file

    report = extract_file(args.base, args.tuned, args.out, args.rank, args.conv_rank, args.precision, args.overwrite)
    report.pop("per_module")
    print(json.dumps(report, indent=2))
    return 0


def cmd_compare(args) -> int:
    """The grid of a run's saves x weights x prompts (compare.py), on a checkpoint loaded here."""
    from .tools import compare
    from .hosts.checkpoint import CheckpointError

    try:
        size = tuple(int(v) for v in args.size.lower().split("x")) if "x" in args.size else (int(args.size),) * 2
    except ValueError:
        raise UsageError(f"--size {args.size!r} is WxH or one number") from None
    try:
        weights = compare.parse_weights(args.weights)
        plan = compare.check(compare.Plan(compare.run_saves(args.run_folder, args.name), weights, args.prompt or [],
                                          args.seed, args.steps, args.cfg_scale, size, args.negative))
        out = args.out or compare.new_folder(args.run_folder, "compare")
        if os.path.exists(out):
            raise UsageError(f"{out} exists; give a new folder (--out)")
        name = args.pretrained_model_name_or_path
        if name and not name.startswith("tiny-") and not os.path.exists(name):
            raise UsageError(f"{name}: no such checkpoint file or diffusers folder")
        host = _host_for(name)
        stop = _StopOnSignal()
        try:
            result = compare.compare(plan, out, compare.preview_renderer(host), stop,
                                     lambda done, total, text: print(f"[{done}/{total}] {text}", file=sys.stderr))
        finally:
            stop.restore()
    except (compare.CompareError, CheckpointError) as e:
        raise UsageError(str(e)) from None
    print(json.dumps({"folder": result.folder, "pages": result.pages, "images": result.cells,
                      "cancelled": result.cancelled}, indent=2))
    return 130 if result.cancelled else 0


BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def cmd_bench(args, extra) -> int:
    """Runs bench/<name>.py of this checkout (full-size random-weight models; minutes, GBs of memory)."""
    import subprocess

    script = os.path.join(BENCH_DIR, f"{args.name}.py")
    if not os.path.isfile(script):
        raise UsageError(f"no benchmark {script}: benchmarks come with a checkout of the repository")
    return subprocess.call([sys.executable, script, *extra])


def cmd_ui(args) -> int:
    from .ui.app import serve

    serve(args.folder, args.port, args.arch)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out)


def _output_args(parser) -> None:
    """The options every command that writes a LoRA file takes."""
    parser.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_ext", description="Train, apply and merge LoRA networks.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="build a tiny model, make a LoRA for it and inspect it")
    d.add_argument("--out", default="demo_out", help="folder for the demo's files (default: demo_out)")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("inspect", help="print what a LoRA file holds, as JSON")
    i.add_argument("file")
    i.add_argument("--model", help="architecture the file is for: sd1, sd2, sdxl (default: detected)")
    i.set_defaults(func=cmd_inspect)
    u = sub.add_parser("ui", help="serve the LoRA tab by itself on 127.0.0.1, on a tiny model")
    u.add_argument("--folder", default="lora_ext_ui", help="work folder (Lora/, Stable-diffusion/, presets/)")
    u.add_argument("--port", type=int, default=7861)
    u.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    u.set_defaults(func=cmd_ui)
    m = sub.add_parser("merge", help="bake LoRAs into a checkpoint (streaming), written as a new file")
    m.add_argument("--model", required=True, help="base checkpoint (.safetensors, or .ckpt read safely)")
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:RATIO[:TE_RATIO]]",
                   help="a LoRA and its UNet / text-encoder ratios (default 1); repeat for more")
    m.add_argument("--out", required=True, help="the new checkpoint (.safetensors, or .ckpt)")
    m.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32", "keep"])
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m.set_defaults(func=cmd_merge)
    _lora_file_commands(sub)
    _compare_command(sub)
    b = sub.add_parser("bench", help="run a benchmark of bench/ (apply, train, merge, memory, webui, forge, cuda); it "
                                     "prints JSON",
                       description="Arguments after the name go to the benchmark (e.g. bench apply --rank 16).",
                       add_help=False)      # so that `bench apply --help` reaches the benchmark
    b.add_argument("name", choices=["apply", "train", "merge", "memory", "webui", "cuda"])
    b.set_defaults(func=cmd_bench)
    _train_command(sub)
    return p


def _lora_file_commands(sub) -> None:
    """The LoRA file tools: resize, merge-loras, extract."""
    r = sub.add_parser("resize", help="a LoRA at another rank (exact SVD of its low-rank delta)")
    r.add_argument("lora")
    r.add_argument("--rank", type=int)
    r.add_argument("--energy", type=float, help="keep the fewest ranks holding this fraction of each module")
    _output_args(r)
    r.add_argument("--verbose", action="store_true", help="kept energy per module")
    r.set_defaults(func=cmd_resize)
    ml = sub.add_parser("merge-loras", help="several LoRAs into one (ranks concatenated, or SVD to --rank)")
    ml.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]")
    ml.add_argument("--rank", type=int)
    _output_args(ml)
    ml.set_defaults(func=cmd_merge_loras)
    x = sub.add_parser("extract", help="a LoRA from the difference of two checkpoints (randomized SVD)")
    x.add_argument("--base", required=True)
    x.add_argument("--tuned", required=True)
    x.add_argument("--rank", type=int, default=32)
    x.add_argument("--conv_rank", type=int)
    _output_args(x)
    x.set_defaults(func=cmd_extract)


def _compare_command(sub) -> None:
    c = sub.add_parser("compare", help="a grid of a run's saved LoRAs x weights x prompts (one image per prompt)")
    c.add_argument("run_folder", help="the run's output_dir: its NAME.safetensors and NAME-000003.safetensors ...")
    c.add_argument("--pretrained_model_name_or_path", "--model", dest="pretrained_model_name_or_path",
                   help="the checkpoint (or diffusers folder) to generate with; tiny-sd1 ... for a test model")
    c.add_argument("--prompt", action="append", help="a test prompt (one page each); repeat for more")
    c.add_argument("--weights", default="0.4,0.7,1.0", help="LoRA weights, the rows (default 0.4,0.7,1.0)")
    c.add_argument("--name", help="the run's output_name, where the folder holds several runs")
    c.add_argument("--negative", default="", help="negative prompt")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--cfg_scale", type=float, default=7.0)
    c.add_argument("--size", default="512", help="WxH or one side (default 512)")
    c.add_argument("--out", help="a new folder for the grid (default: RUN_FOLDER/compare-<time>)")
    c.set_defaults(func=cmd_compare)


def _train_command(sub) -> None:
    """`train`: every TrainConfig field as a kohya option of the same name; kohya's other options (all of
    train_network.py's) are taken too, each with what lora_ext does with it in --help, and judged by the
    config's checks (train.kohya_options)."""
    import dataclasses

    from .train.config import TrainConfig
    from .train.kohya_options import KOHYA_DEFAULTS, status

    t = sub.add_parser("train", help="train a LoRA; options keep the names of kohya's train_network.py",
                       allow_abbrev=False)      # --x must not quietly mean --xformers
    t.add_argument("--config", "--config_file", dest="config_file", help="a TOML file of options")
    for f in dataclasses.fields(TrainConfig):
        default = TrainConfig.__dataclass_fields__[f.name].default
        if isinstance(default, bool):
            t.add_argument(f"--{f.name}", action="store_true", default=None)
        elif f.name in ("network_args", "optimizer_args", "lr_scheduler_args", "sample_prompts", "text_encoder_lr",
                        "base_weights", "base_weights_multiplier"):
            t.add_argument(f"--{f.name}", nargs="*", default=None)
        else:
            t.add_argument(f"--{f.name}", default=None)
    kohya = t.add_argument_group("kohya's other train_network.py options",
                                 "taken under their names; what each does here:")
    for name in sorted(set(KOHYA_DEFAULTS) - set(TrainConfig.__dataclass_fields__) - {"config_file"}):
        kohya.add_argument(f"--{name}", nargs="*", default=None, metavar="VALUE", help=status(name))
    t.set_defaults(func=cmd_train)


def main(argv=None) -> int:
    from .files import LoraFileError

    args, extra = build_parser().parse_known_args(argv)
    try:
        if args.func in (cmd_train, cmd_bench):
            return args.func(args, extra)
        if extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except (UsageError, LoraFileError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:           # a full disk, a read-only folder, a file that vanished: no file was written
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e} (nothing was written under "
              "the output's name)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (nothing was written under an output's name that was not whole)", file=sys.stderr)
        return 130
