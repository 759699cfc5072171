"""The training form's fields: which TrainConfig option, in which group, with what label and advice. The form,
its presets (the TOML the CLI reads) and its tooltips all come from this one list."""
from __future__ import annotations

from dataclasses import dataclass

from ..train.config import HUBER_SCHEDULES, LOSS_TYPES, RESIZE_FILTERS
from ..train.kohya_options import OPTIMIZER_NAMES
from ..train.schedules import SCHEDULERS


@dataclass(frozen=True)
class Field:
    name: str                   # the TrainConfig / kohya option
    group: str
    label: str
    advice: object              # the tip's text, or a function giving it (read when asked)
    kind: str = "text"          # text | number | int | bool | choice | lines
    options: object = ()        # the choices, or a function giving them
    arg: bool = False           # a network_args entry with its own control (LyCORIS's algo, dora_wd)

    @property
    def tip(self) -> str:
        return self.advice() if callable(self.advice) else self.advice

    @property
    def choices(self) -> tuple:
        return tuple(self.options()) if callable(self.options) else self.options


def _network_types_advice() -> str:
    # from the type registry, read when the form is built (importing it imports torch: not at the
    # webui's start-up)
    from ..networks.kinds import trained
    return (" ".join(t.help for t in trained()) + " Every type but kohya's LoRA is LyCORIS's: the module switches "
            "to lycoris.kohya, which trains the convolutions at the network dim unless conv_dim says otherwise.")


def _network_type_choices() -> tuple:
    from ..networks.kinds import training_algos
    return tuple(training_algos())


F = Field
FIELDS = (
    F("pretrained_model_name_or_path", "Model & output", "Model",
      "Standalone: a checkpoint file or diffusers folder. In the webui, the loaded checkpoint is used."),
    F("output_dir", "Model & output", "Output folder", "Where the LoRA, its samples and its state go."),
    F("output_name", "Model & output", "Output name", "The LoRA is written as <folder>/<name>.safetensors."),
    F("overwrite", "Model & output", "Overwrite", "Replace an existing LoRA of this name (a resume always may).",
      "bool"),
    F("train_data_dir", "Dataset", "Train folder", "Holds concept folders named N_name (N repeats)."),
    F("reg_data_dir", "Dataset", "Regularization folder", "Optional; same folder rules. Doubles the steps."),
    F("caption_extension", "Dataset", "Caption extension", "Captions are same-named files with this extension."),
    F("resolution", "Dataset", "Resolution", "512 for SD1, 768 for SD2-768, 1024 for SDXL; 'w,h' for non-square."),
    F("enable_bucket", "Dataset", "Aspect-ratio buckets", "Train at each image's own aspect ratio instead of square crops.", "bool"),
    F("bucket_no_upscale", "Dataset", "Buckets never upscale",
      "Each image's bucket from its own size, cut to 64-multiples: small images are not enlarged (kohya's).", "bool"),
    F("dataset_config", "Dataset", "Dataset TOML (kohya)",
      "A kohya dataset TOML file: its subsets (folders, repeats, caption options) replace the folders above; "
      "each [[datasets]] keeps its resolution and batch size.", "text"),
    F("flip_aug", "Dataset", "Horizontal flip", "Not for asymmetric characters.", "bool"),
    F("shuffle_caption", "Dataset", "Shuffle caption tags", "Shuffles comma-separated tags after the kept ones.", "bool"),
    F("keep_tokens", "Dataset", "Keep first N tags", "Tags never shuffled (e.g. the trigger word).", "int"),
    F("caption_dropout_rate", "Dataset", "Caption dropout", "Share of steps trained without caption.", "number"),
    F("caption_dropout_every_n_epochs", "Dataset", "Caption dropout every N epochs",
      "Every Nth epoch trains without captions (kohya's; 0 = never).", "int"),
    F("resize_interpolation", "Dataset", "Resize filter",
      "How images are scaled to their bucket; empty: area when shrinking, lanczos when enlarging (kohya's).",
      "choice", ("",) + tuple(RESIZE_FILTERS)),
    F("caption_prefix", "Dataset", "Caption prefix", "Put before every caption (a trigger word, say).", "text"),
    F("caption_suffix", "Dataset", "Caption suffix", "Put after every caption.", "text"),
    F("keep_tokens_separator", "Dataset", "Keep-tokens separator",
      "A marker such as |||: tags before it (and after a second one) stay in place when shuffling.", "text"),
    F("caption_tag_dropout_rate", "Dataset", "Tag dropout", "Share of tags left out each step (kept ones stay).",
      "number"),
    F("enable_wildcard", "Dataset", "Wildcards", "{a|b} in a caption picks one each step; of several lines, one.",
      "bool"),
    F("network_dim", "Network", "Network dim (rank)",
      "128 is the guide's default; 32-64 is usually enough. Higher needs more VRAM.", "int"),
    F("network_alpha", "Network", "Network alpha", "Scales the LoRA by alpha/dim; 1 or dim/2 are common.", "number"),
    F("algo", "Network", "Network type", _network_types_advice, "choice", _network_type_choices, arg=True),
    F("dora_wd", "Network", "DoRA (weight-decomposed)",
      "Also learns each layer's magnitude apart from its direction; often closer to a full fine-tune at the same "
      "dim, but slower and heavier (the whole weight is rebuilt every step). Any type; switches to lycoris.kohya.",
      "bool", arg=True),
    F("network_module", "Network", "Network module",
      "networks.lora: kohya's LoRA / LoCon. lycoris.kohya: LyCORIS's types (chosen for you by the type above).",
      "choice", ("networks.lora", "lycoris.kohya")),
    F("network_args", "Network", "Network args",
      "One per line, as kohya and LyCORIS take them: conv_dim=8, conv_alpha=4, rank_dropout=0.1, module_dropout=0.1; "
      "LyCORIS: use_tucker=True, factor=8, decompose_both=True, full_matrix=True.", "lines"),
    F("network_dropout", "Network", "Dropout", "Dropout on the LoRA branch (0 = none).", "number"),
    F("network_train_unet_only", "Network", "Train the UNet only",
      "The usual choice for SDXL: both text encoders stay as they are (less memory, faster).", "bool"),
    F("train_batch_size", "Optimizer & schedule", "Batch size", "Raise the learning rate with the batch size.", "int"),
    F("max_train_epochs", "Optimizer & schedule", "Epochs", "Start with 5-10 and compare the saved epochs.", "int"),
    F("max_train_steps", "Optimizer & schedule", "Max steps", "Used when Epochs is 0 (as in kohya, epochs win).", "int"),
    F("learning_rate", "Optimizer & schedule", "Learning rate", "1e-4 for SD1.x models.", "number"),
    F("unet_lr", "Optimizer & schedule", "UNet learning rate", "Empty = the learning rate; 0 = UNet frozen.", "text"),
    F("text_encoder_lr", "Optimizer & schedule", "Text encoder learning rate",
      "Empty = the learning rate; some halve it (5e-5); 0 = text encoder frozen. SDXL: one value for both "
      "encoders, or two ('1e-5, 2e-5').", "text"),
    F("lr_scheduler", "Optimizer & schedule", "Scheduler", "How the learning rate changes over the run.", "choice", SCHEDULERS),
    F("lr_warmup_steps", "Optimizer & schedule", "Warm-up steps", "Steps rising from 0 to the learning rate.", "int"),
    F("lr_scheduler_min_lr_ratio", "Optimizer & schedule", "Minimum lr ratio",
      "cosine_with_min_lr and warmup_stable_decay end at this share of the learning rate (empty: 0).", "text"),
    F("lr_decay_steps", "Optimizer & schedule", "Decay steps",
      "warmup_stable_decay: the last steps, falling to the minimum (below 1: a share of the run).", "number"),
    F("optimizer_type", "Optimizer & schedule", "Optimizer", "AdamW8bit saves memory on NVIDIA GPUs.", "choice",
      OPTIMIZER_NAMES),
    F("max_token_length", "Text", "Max token length",
      "From your longest caption: up to 75 tokens 75, up to 150 150, else 225.", "choice", ("75", "150", "225")),
    F("clip_skip", "Text", "Clip skip", "1 for SD-based models, 2 for NAI-based ones.", "int"),
    F("mixed_precision", "Precision & memory", "Mixed precision", "bf16 if the card has it (RTX 30xx+), else fp16.",
      "choice", ("fp16", "bf16", "no")),
    F("save_precision", "Precision & memory", "Save precision", "fp16 files are half the size.", "choice",
      ("fp16", "bf16", "fp32")),
    F("gradient_checkpointing", "Precision & memory", "Gradient checkpointing",
      "Less memory: UNet blocks are recomputed in backward (all of them: about 25% slower); the margin below "
      "keeps the activations of those it can afford.", "bool"),
    F("checkpointing_margin", "Precision & memory", "Checkpointing margin",
      "With checkpointing: up to this share more memory (0.1 = 10%) keeps the activations of the blocks that "
      "are cheapest to keep, for speed; 0 = recompute every block.", "number"),
    F("frozen_weights", "Precision & memory", "Frozen weights (standalone fp32)",
      "Standalone fp32 runs on a CPU: as_stored holds an fp16 file's frozen weights in fp16 (the same values, "
      "half the memory, slower steps); fp32 holds fp32 copies, as kohya. The webui's model is used as it is.",
      "choice", ("fp32", "as_stored")),
    F("cache_latents", "Precision & memory", "Cache latents", "Encode each image once; faster, less VRAM.", "bool"),
    F("no_half_vae", "Precision & memory", "VAE in full precision",
      "With bf16: encode the images in the VAE's own precision, not bf16 (on a CPU twice the encode time).", "bool"),
    F("cache_text_encoder_outputs", "Precision & memory", "Cache text encoder outputs",
      "Encode each caption once, then the text encoders leave the GPU. Needs 'Train the UNet only' and no caption "
      "shuffle or dropout.", "bool"),
    F("sample_every_n_epochs", "Samples & saving", "Sample every N epochs", "Preview images (0 = none).", "int"),
    F("sample_at_first", "Samples & saving", "Sample before training",
      "Previews of the model as it is, before the first step, to compare with.", "bool"),
    F("sample_every_n_steps", "Samples & saving", "Sample every N steps", "Preview images by steps (0 = none).", "int"),
    F("sample_prompts", "Samples & saving", "Sample prompts",
      "One prompt per line, kohya's options after it (--n negative, --w/--h size, --d seed, --l CFG, --s steps); "
      "or the path of a kohya prompt file (.txt, .toml, .json).", "lines"),
    F("save_every_n_epochs", "Samples & saving", "Save every N epochs", "Keep earlier epochs to compare (0 = last only).", "int"),
    F("save_last_n_epochs", "Samples & saving", "Keep last N saves",
      "Of the numbered saves, keep those of the last N x (every N epochs) epochs; older ones are deleted (0 = all).",
      "int"),
    F("resume", "Samples & saving", "Resume from state",
      "After a cancel or crash: the <name>-state folder the status names; the run continues where it stopped."),
    F("seed", "Advanced", "Seed", "The same seed and settings give the same LoRA.", "int"),
    F("noise_offset", "Advanced", "Noise offset", "0.05-0.1 helps very dark or bright images.", "number"),
    F("min_snr_gamma", "Advanced", "Min-SNR gamma", "5 is the paper's value; 0 = off.", "number"),
    F("loss_type", "Advanced", "Loss", "l2 is the usual; huber and smooth_l1 are less hurt by outliers.", "choice",
      LOSS_TYPES),
    F("huber_schedule", "Advanced", "Huber schedule", "How the huber threshold follows the noise level.", "choice",
      HUBER_SCHEDULES),
    F("huber_c", "Advanced", "Huber c", "The huber threshold (kohya's default 0.1).", "number"),
    F("multires_noise_iterations", "Advanced", "Multires noise", "6-10 adds noise at coarser scales; 0 = off.", "int"),
    F("multires_noise_discount", "Advanced", "Multires discount", "Weight of each coarser scale (0.3 usual).",
      "number"),
    F("ip_noise_gamma", "Advanced", "Input perturbation", "0.1 is usual: extra noise in the model's input only.",
      "number"),
    F("scale_weight_norms", "Advanced", "Max norm (scale weight norms)",
      "Caps each LoRA module's change at this norm after every step (kohya's; 1 is common, 0 off). LoRA/LoCon.",
      "number"),
    F("debiased_estimation_loss", "Advanced", "Debiased estimation", "Weights the loss down at low noise levels.",
      "bool"),
    F("gradient_accumulation_steps", "Advanced", "Gradient accumulation", "Steps summed before each update.", "int"),
    F("min_timestep", "Advanced", "Min timestep", "Noise levels trained: from this (0-999) ...", "int"),
    F("max_timestep", "Advanced", "Max timestep", "... up to, not including, this (1-1000).", "int"),
    F("v_parameterization", "Advanced", "V-prediction",
      "For v-prediction models (SD2-768, v-pred SDXL such as NoobAI-XL V-Pred); a model whose config says so "
      "is trained so anyway.", "bool"),
    F("zero_terminal_snr", "Advanced", "Zero terminal SNR",
      "Rescales the noise schedule so the last step is pure noise; for v-prediction models.", "bool"),
)
GROUPS = tuple(dict.fromkeys(f.group for f in FIELDS))


ARG_FIELDS = tuple(f.name for f in FIELDS if f.arg)


def _arg_name(entry: str) -> str:
    return str(entry).partition("=")[0].strip()


def values_to_options(values: list) -> dict:
    """The form's values (in FIELDS order) as config options, blanks left out."""
    out, picked = {}, {}
    for field, value in zip(FIELDS, values):
        if field.arg:
            picked[field.name] = value
            continue
        if value is None or value == "":
            continue
        if field.kind == "lines":
            value = [line.strip() for line in str(value).splitlines() if line.strip()]
        elif field.name == "max_token_length":
            value = int(value)
        out[field.name] = value
    return _with_network_type(out, picked.get("algo") or "lora", bool(picked.get("dora_wd")))


def _with_network_type(out: dict, algo: str, dora: bool) -> dict:
    """The type controls written into network_module / network_args: LyCORIS's types and DoRA need its module."""
    from ..train import network_args     # here, not at import: it brings torch, and the webui loads this early

    rest = [a for a in out.get("network_args", []) if _arg_name(a) not in ARG_FIELDS]
    if algo != "lora" or dora:
        out["network_module"] = network_args.LYCORIS
    lycoris = network_args.is_lycoris(out.get("network_module", network_args.KOHYA))
    args = ([f"algo={algo}"] if lycoris else []) + rest + (["dora_wd=True"] if dora else [])
    if args or "network_args" in out:
        out["network_args"] = args
    return out


def _arg_value(cfg, name: str):
    from ..train import network_args

    given = cfg.net_args
    if name == "algo":
        return given.get("algo", "lora").lower()
    return given.get(name, "").lower() in network_args.TRUE


def options_to_values(cfg) -> list:
    """A config's options as the form's values."""
    values = []
    for field in FIELDS:
        if field.arg:
            values.append(_arg_value(cfg, field.name))
            continue
        v = getattr(cfg, field.name)
        if field.name == "network_args":
            v = [a for a in v if _arg_name(a) not in ARG_FIELDS]
        if field.kind == "lines":
            v = "\n".join(v)
        elif isinstance(v, list):
            v = ", ".join(str(x) for x in v)
        elif field.name == "max_token_length":
            v = str(v)
        elif v is None:
            v = ""
        values.append(v)
    return values
