"""kohya's dataset TOML (`--dataset_config`, its config_README): `[general]`, `[[datasets]]` and their
`[[datasets.subsets]]`. A subset is a folder of images with its repeats, captions and augmentation; a dataset
gives its subsets a resolution, a batch size and buckets. A value is looked up in the subset, then its
dataset, then [general], then the run's own options (kohya's command line), then kohya's default. With a
dataset TOML, train_data_dir and reg_data_dir are not read (as in kohya).

Each subset's images keep their subset's options (dataset.Item.options); each dataset is a dataset.Layout.
The run-wide decisions (the memory estimate, whether the VAE may leave, the saved metadata) read `widest`:
the largest resolution and batch, and any subset's augmentation."""
from __future__ import annotations

import dataclasses
import os

from . import dataset, kohya_options


class DatasetConfigError(dataset.DatasetError):
    """A dataset TOML that cannot be read; the message names every problem of the file."""

# kohya's schema (config_util.ConfigSanitizer, DreamBooth subsets with caption dropout), by the kind kohya checks
# options of a subset that its dataset and [general] may also give
SUBSET_SHARED = {
    "num_repeats": int, "shuffle_caption": bool, "caption_separator": str, "keep_tokens": int,
    "keep_tokens_separator": str, "secondary_separator": str, "enable_wildcard": bool, "flip_aug": bool,
    "random_crop": bool, "caption_prefix": str, "caption_suffix": str, "caption_dropout_rate": float,
    "caption_tag_dropout_rate": float, "caption_extension": str, "class_tokens": str,
    "color_aug": bool, "face_crop_aug_range": "pair", "caption_dropout_every_n_epochs": int,
    "token_warmup_min": int, "token_warmup_step": float, "custom_attributes": dict, "resize_interpolation": str,
    "cache_info": bool,
}
# only in a subset
SUBSET_OWN = {"image_dir": str, "is_reg": bool, "alpha_mask": bool}
# of a dataset, which [general] may also give
DATASET_SHARED = {
    "batch_size": int, "resolution": "resolution", "enable_bucket": bool, "min_bucket_reso": int,
    "max_bucket_reso": int, "bucket_reso_steps": int, "bucket_no_upscale": bool, "validation_seed": int,
    "validation_split": float, "network_multiplier": float,
}
# options lora_ext's TrainConfig has under another name (kohya's command line: --train_batch_size)
_RUN_NAME = {"batch_size": "train_batch_size"}
# subsets kohya trains that are not folders of captioned images
_OTHER_SUBSETS = {
    "metadata_file": "fine-tuning subsets (metadata_file) are not done: give image folders with caption files",
    "conditioning_data_dir": "ControlNet subsets (conditioning_data_dir) are not LoRA datasets",
}
# what the options lora_ext does not do here say, where kohya_options has no line for them
_NOT_DONE = {
    "network_multiplier": "a dataset's own network multiplier is not done here",
    "custom_attributes": "",        # read by kohya's newer model families only: no effect on SD
    "cache_info": "",               # no effect: kohya_options.NO_EFFECT
    "validation_seed": "",          # meaningful only with validation_split
}
_DEFAULTS = {"num_repeats": 1, "is_reg": False, "class_tokens": None, "network_multiplier": 1.0,
             "custom_attributes": None, "validation_seed": None, "batch_size": 1}


@dataclasses.dataclass
class Plan:
    """What a dataset TOML asks for: one Layout per [[datasets]], one Source per subset."""
    layouts: list
    sources: list
    notes: list


def read(cfg) -> Plan:
    """The plan of cfg.dataset_config. Raises DatasetConfigError naming every problem of the file."""
    plan, problems = _read(cfg)
    if problems:
        raise DatasetConfigError(f"dataset_config {cfg.dataset_config}: " + "; ".join(problems))
    return plan


def problems(cfg) -> list:
    """The problems of cfg.dataset_config (none when not given), for the one message of a run's options."""
    if not cfg.dataset_config:
        return []
    _, found = _read(cfg)
    return [f"dataset_config {cfg.dataset_config}: " + "; ".join(found)] if found else []


def scan_run(cfg) -> dataset.Scan:
    """The run's images: from its dataset TOML when it has one, else from its folders."""
    if not cfg.dataset_config:
        return dataset.scan(cfg.train_data_dir, cfg.reg_data_dir or None, cfg.caption_extension,
                            dataset.Layout.of(cfg))
    plan = read(cfg)
    result = dataset.Scan(layouts=plan.layouts, warnings=list(plan.notes))
    for src in plan.sources:
        if not os.path.isdir(src.folder):
            raise dataset.DatasetError(f"dataset_config {cfg.dataset_config}: image_dir {src.folder!r} does not exist")
        dataset.scan_concept(result, src)
    return dataset.checked(result, cfg.dataset_config, "its subsets' image_dir folders hold no readable images",
                           "no caption file; their subset's class_tokens are used (none given: an empty caption)")


def widest(cfg):
    """`cfg` as the whole run is: with a dataset TOML, its largest resolution (by area) and batch, buckets if
    any dataset has them, and each augmentation and caption change some subset asks for."""
    if not cfg.dataset_config:
        return cfg
    try:
        plan = read(cfg)
    except DatasetConfigError:
        return cfg
    w, h = max((x.size for x in plan.layouts), key=lambda s: s[0] * s[1])
    opts = [s.options for s in plan.sources]
    return dataclasses.replace(
        cfg, resolution=f"{w},{h}", train_batch_size=max(x.batch_size for x in plan.layouts),
        enable_bucket=any(x.enable_bucket for x in plan.layouts),
        bucket_no_upscale=any(x.bucket_no_upscale for x in plan.layouts),
        **{n: any(getattr(o, n) for o in opts) for n in ("flip_aug", "random_crop", "shuffle_caption", "enable_wildcard")},
        **{n: max(getattr(o, n) for o in opts) for n in ("caption_dropout_rate", "caption_tag_dropout_rate")})


# --- reading --------------------------------------------------------------------------------------------

def _read(cfg) -> tuple[Plan, list]:
    from ..toml_text import parse

    path = cfg.dataset_config
    try:
        with open(path, encoding="utf-8") as f:
            data = parse(f.read())
    except FileNotFoundError:
        return Plan([], [], []), ["no such file"]
    except UnicodeDecodeError:
        return Plan([], [], []), ["not a text file (TOML is UTF-8)"]
    except (OSError, ValueError) as e:
        return Plan([], [], []), [str(e)]
    found: list = []
    general = _table(data.get("general", {}), "[general]", {**DATASET_SHARED, **SUBSET_SHARED}, found)
    for key in data:
        if key not in ("general", "datasets"):
            found.append(f"[{key}]: kohya's dataset TOML has [general] and [[datasets]] only")
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        found.append("no [[datasets]]")
        return Plan([], [], []), found
    plan = Plan([], [], [])
    if cfg.train_data_dir or cfg.reg_data_dir:
        plan.notes.append("train_data_dir and reg_data_dir are not read: the dataset TOML names the folders "
                          "(as in kohya)")
    for d, raw in enumerate(datasets):
        where = f"[[datasets]] {d + 1}"
        table = _table(raw, where, {**DATASET_SHARED, **SUBSET_SHARED, "subsets": list}, found)
        subsets = table.pop("subsets", [])
        if not subsets:
            found.append(f"{where} has no [[datasets.subsets]]")
        chain = (table, general)
        plan.layouts.append(_layout(chain, cfg, where, found))
        for s, raw_subset in enumerate(subsets):
            sub_where = f"{where}, subset {s + 1}"
            other = [k for k in _OTHER_SUBSETS if isinstance(raw_subset, dict) and k in raw_subset]
            if other:
                found.append(f"{sub_where}: {_OTHER_SUBSETS[other[0]]}")
                continue
            sub = _table(raw_subset, sub_where, {**SUBSET_SHARED, **SUBSET_OWN}, found)
            if "image_dir" not in sub:
                found.append(f"{sub_where} has no image_dir")
                continue
            source = _source(d, (sub, *chain), cfg, sub_where, found)
            if source.repeats < 1:      # kohya leaves such a subset out, and says so
                plan.notes.append(f"{sub_where} ({source.folder}) is left out: num_repeats {source.repeats}")
            else:
                plan.sources.append(source)
    return plan, found


def _table(raw, where: str, schema: dict, found: list) -> dict:
    """The entries of one table whose names the schema has and whose values are of its kinds; the others
    said in `found`."""
    if not isinstance(raw, dict):
        found.append(f"{where} is not a table")
        return {}
    out = {}
    for key, value in raw.items():
        kind = schema.get(key)
        if kind is None:
            found.append(f"{where}: {key!r} is not an option of this table in kohya's dataset TOML")
        elif not _fits(kind, value):
            found.append(f"{where}: {key} = {value!r} is not {_KIND_TEXT.get(kind, kind.__name__ if isinstance(kind, type) else kind)}")
        else:
            out[key] = value
    return out


_KIND_TEXT = {bool: "true or false", int: "a whole number", float: "a number", str: "text", dict: "a table",
              list: "a list of tables", "pair": "a list of two numbers", "resolution": "a size (512 or [768, 512])"}


def _fits(kind, value) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "pair":
        return isinstance(value, list) and len(value) == 2 and all(_fits(float, v) for v in value)
    if kind == "resolution":
        return _fits(int, value) or (isinstance(value, list) and len(value) == 2 and all(_fits(int, v) for v in value))
    return isinstance(value, kind)


def _lookup(name: str, chain: tuple, cfg):
    """kohya's fallback: the first table of `chain` that gives `name`, then the run's option, then kohya's
    default."""
    for table in chain:
        if table.get(name) is not None:
            return table[name]
    run_name = _RUN_NAME.get(name, name)
    if run_name in _fields(cfg):
        return getattr(cfg, run_name)
    return _DEFAULTS.get(name, kohya_options.KOHYA_DEFAULTS.get(name))


def _fields(cfg) -> set:
    return {f.name for f in dataclasses.fields(cfg)}


def _layout(chain: tuple, cfg, where: str, found: list) -> dataset.Layout:
    values = {n: _lookup(n, chain, cfg) for n in DATASET_SHARED}
    size = values["resolution"]
    size = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, list) else cfg.size
    _not_done(values, where, found)
    if size[0] < 64 or size[1] < 64 or size[0] % 8 or size[1] % 8:
        found.append(f"{where}: resolution {size[0]}x{size[1]}: each side is a multiple of 8, at least 64")
    if not 1 <= values["batch_size"] <= 4096:
        found.append(f"{where}: batch_size {values['batch_size']}: from 1 to 4096")
    if values["min_bucket_reso"] > values["max_bucket_reso"]:
        found.append(f"{where}: min_bucket_reso is larger than max_bucket_reso")
    if values["bucket_reso_steps"] < 8:
        found.append(f"{where}: bucket_reso_steps {values['bucket_reso_steps']}: at least 8")
    return dataset.Layout(size, values["batch_size"], values["enable_bucket"], values["min_bucket_reso"],
                          values["max_bucket_reso"], max(8, values["bucket_reso_steps"]), values["bucket_no_upscale"])


def _source(group: int, chain: tuple, cfg, where: str, found: list) -> dataset.Source:
    values = {n: _lookup(n, chain, cfg) for n in (*SUBSET_SHARED, *SUBSET_OWN)}
    _not_done(values, where, found)
    options = dataclasses.replace(cfg, **{n: values[n] for n in SUBSET_SHARED if n in _fields(cfg)})
    found += [f"{where}: {p}" for p in options.caption_problems()]
    if values["num_repeats"] > dataset.MAX_REPEATS:
        found.append(f"{where}: num_repeats {values['num_repeats']}: at most {dataset.MAX_REPEATS}")
    folder = values["image_dir"]
    return dataset.Source(folder, os.path.basename(os.path.normpath(folder)) or folder, values["num_repeats"],
                          values["is_reg"], dataset.dotted(options.caption_extension),
                          values["class_tokens"] or "", group, options)


def _not_done(values: dict, where: str, found: list) -> None:
    """The options given that lora_ext does not do, unless at kohya's default."""
    for name, value in values.items():
        why = _NOT_DONE.get(name, kohya_options.REFUSED.get(name))
        if not why:
            continue
        asks = value != _DEFAULTS[name] if name in _DEFAULTS else not kohya_options.at_default(name, value)
        if asks:
            found.append(f"{where}: {name}: {why}")
