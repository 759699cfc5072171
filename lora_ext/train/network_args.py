"""What network a run trains, from the options kohya's and LyCORIS's users already write:
`--network_module networks.lora` (kohya: LoRA, LoCon with conv_dim) or `--network_module lycoris.kohya` with
`--network_args "algo=loha" "conv_dim=8" ...` (LyCORIS: lora/locon, loha, lokr; DoRA with dora_wd=True).
The names mean what they mean there, defaults included (LyCORIS trains the kxk convolutions at network_dim
unless told otherwise; kohya only with conv_dim). One default differs on purpose: DoRA's magnitude is kept per
input channel, the one axis the webui's built-in Lora reads, unless wd_on_output=True (LyCORIS's default)."""
from __future__ import annotations

from dataclasses import dataclass

from ..networks.kinds import BY_NAME, TYPES, trained, training_algos
from ..networks.kinds.trainable import Options
from ..weights import number, out_of_range

KOHYA, LYCORIS = "networks.lora", "lycoris.kohya"
MODULES = {"networks.lora": KOHYA, "lora": KOHYA, "lycoris.kohya": LYCORIS, "lycoris": LYCORIS}
# LyCORIS algo -> the kinds.TYPES name that trains it, and the algos of types read but not trained: both from
# the type registry (networks/kinds); LyCORIS algorithms whose files no type reads are named here
ALGOS = {algo: t.name for algo, t in training_algos().items()}
NOT_TRAINED = {**{algo: t.title for t in TYPES if t not in trained() for algo in t.algos},
               "dylora": "DyLoRA", "tlora": "TLoRA"}

_FRACTION = (0, 0.99, float)
NUMBERS = {"conv_dim": (1, 4096, int), "conv_alpha": (0, None, float), "dropout": _FRACTION,
           "rank_dropout": _FRACTION, "module_dropout": _FRACTION, "factor": (-1, 4096, int)}
FLAGS = ("dora_wd", "wd_on_output", "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp", "decompose_both",
         "full_matrix")
KOHYA_ARGS = {"conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout"}
# LyCORIS options that would change the result and that we do not train: named, never ignored; given as off
# (the kohya_ss GUI writes use_scalar=False ... into every LyCORIS run) they ask for nothing and are accepted
LYCORIS_UNSUPPORTED = ("use_scalar", "train_norm", "bypass_mode", "rs_lora", "rescaled", "constraint",
                       "unbalanced_factorization", "block_size", "weight_decompose_rank", "rank_dropout_scale",
                       "train_on_input")


# LyCORIS's idiom for a LoKr of full matrices: a dim at least half the layer's larger factor (100000, say);
# each layer then gets its full factors (kinds.lokr), so any dim up to this is taken
FULL_MATRIX_DIM = 10 ** 6


def full_matrix_idiom(cfg) -> bool:
    """Whether a dim above the usual range means LyCORIS's full matrix: a LoKr."""
    return is_lycoris(cfg.network_module) and str(cfg.net_args.get("algo", "")).strip().lower() == "lokr"


class NetworkArgsError(ValueError):
    pass


@dataclass(frozen=True)
class NetworkSpec:
    module: str                 # KOHYA | LYCORIS: what ss_network_module says
    algo: str                   # 'lora' | 'loha' | 'lokr'
    conv_dim: int | None        # None: the kxk convolutions are not trained
    conv_alpha: float | None
    options: Options
    args: dict                  # the network_args as given (ss_network_args)
    dim: int                    # network_dim / network_alpha: the linear layers' rank and alpha
    alpha: float
    lrs: dict                   # {'unet', 'te', 'te1', 'te2': lr}: a part whose lr is 0 is not trained
    notes: tuple = ()
    ranks_from: str = ""        # kohya's dim_from_weights: the file whose layers and ranks the network takes

    def file_args(self) -> dict | None:
        """ss_network_args: LyCORIS's as given, with the algorithm and the conv rank it ran with spelled out
        (None for kohya's module: LoCon's conv_dim/conv_alpha are written from the spec)."""
        if self.module != LYCORIS:
            return None
        return {**self.args, "algo": self.args.get("algo", "lora"), "conv_dim": self.conv_dim,
                "conv_alpha": f"{self.conv_alpha:g}"}

    @property
    def title(self) -> str:
        name = "LoCon" if self.algo == "lora" and self.conv_dim else BY_NAME[self.algo].title
        return name + (" + DoRA" if self.options.dora else "")


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "none", "")


def is_lycoris(module: str) -> bool:
    return MODULES.get(str(module).strip()) == LYCORIS


def _flag(args: dict, name: str, default: bool = False) -> bool:
    v = str(args.get(name, default)).strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise NetworkArgsError(f"network_args {name}={args[name]!r} is not true or false")


def _numbers(args: dict, full_matrix: bool = False) -> tuple[dict, list]:
    values, problems = {}, []
    for name, (lo, hi, kind) in NUMBERS.items():
        if name == "conv_dim" and full_matrix:
            hi = FULL_MATRIX_DIM
        if name not in args:
            continue
        try:
            v = number(args[name], kind)
        except ValueError:
            problems.append(f"network_args {name}={args[name]!r} is not {'a whole' if kind is int else 'a'} number")
            continue
        problem = out_of_range(f"network_args {name}", v, lo, hi)
        if problem:
            problems.append(problem)
        values[name] = v
    if values.get("factor") == 0:
        problems.append("network_args factor = 0: give -1 (as balanced as the size allows) or a divisor")
    return values, problems


def _unknown(module: str, args: dict) -> list:
    known = KOHYA_ARGS if module == KOHYA else set(NUMBERS) | set(FLAGS) | {"algo", "preset"}
    problems = []
    unknown = sorted(set(args) - known)
    lyco_only = [a for a in unknown if module == KOHYA and (a in NUMBERS or a in FLAGS or a in ("algo", "preset"))]
    if lyco_only:
        problems.append(f"network_args {', '.join(lyco_only)}: LyCORIS options; add --network_module lycoris.kohya")
    unsupported = [a for a in unknown if a in LYCORIS_UNSUPPORTED]
    if unsupported:
        problems.append(f"network_args {', '.join(unsupported)}: LyCORIS options lora_ext does not train")
    rest = [a for a in unknown if a not in lyco_only and a not in unsupported]
    if rest:
        problems.append(f"network_args not supported: {', '.join(rest)}")
    return problems


def _algo(args: dict) -> str:
    algo = str(args.get("algo", "lora")).strip().lower()
    if algo in NOT_TRAINED:
        raise NetworkArgsError(f"algo={algo}: {NOT_TRAINED[algo]} is not trained by lora_ext (it trains "
                               f"{', '.join(ALGOS)}, each with DoRA by dora_wd=True)")
    if algo not in ALGOS:
        raise NetworkArgsError(f"algo={algo!r} is not a LyCORIS algorithm lora_ext knows ({', '.join(ALGOS)})")
    return ALGOS[algo]


def spec(cfg) -> NetworkSpec:
    """The network cfg asks for; NetworkArgsError naming every problem. A run parses it once (loop.prepare:
    Run.spec); what looks before a run (the form, the memory estimate, the CLI's loading plan) parses its own."""
    module = MODULES.get(str(cfg.network_module).strip())
    if module is None:
        raise NetworkArgsError(f"network_module {cfg.network_module!r}: lora_ext trains networks.lora (kohya's "
                               "LoRA / LoCon) and lycoris.kohya (algo=lora, locon, loha, lokr)")
    args = {k: v for k, v in cfg.net_args.items()
            if not (k in LYCORIS_UNSUPPORTED and str(v).strip().lower() in FALSE)}
    values, problems = _numbers(args, full_matrix_idiom(cfg))
    problems += _unknown(module, args)
    if str(args.get("preset", "full")).strip().lower() != "full":
        problems.append(f"network_args preset={args['preset']}: lora_ext trains LyCORIS's full preset "
                        "(kohya's layers); choose the parts with the learning rates")
    try:
        algo = _algo(args) if module == LYCORIS else "lora"
        flags = {f: _flag(args, f) for f in FLAGS if f != "wd_on_output"}
        on_output = _flag(args, "wd_on_output")
    except NetworkArgsError as e:
        problems.append(str(e))
    if problems:
        raise NetworkArgsError("; ".join(problems))
    return _build(cfg, module, algo, values, flags, on_output, args)


def _build(cfg, module, algo, values, flags, on_output, args) -> NetworkSpec:
    notes = []
    if module == LYCORIS:       # LyCORIS: convolutions at network_dim / network_alpha unless told
        conv_dim = values.get("conv_dim", cfg.network_dim)
        conv_alpha = values.get("conv_alpha", cfg.network_alpha)
    else:
        conv_dim = values.get("conv_dim")
        conv_alpha = values.get("conv_alpha", 1.0) if conv_dim else None
    dropout = values.get("dropout", 0.0) or cfg.network_dropout
    if dropout and algo != "lora":
        notes.append(f"network_dropout has no effect on {BY_NAME[algo].title} (LyCORIS has none for it either): "
                     "use rank_dropout or module_dropout")
    if on_output and flags["dora_wd"]:
        notes.append("wd_on_output=True: the DoRA magnitude is saved per output channel, which the webui's "
                     "built-in Lora misapplies (it reads one per input channel); lora_ext and ComfyUI read both")
    tucker = (flags["use_tucker"] or flags["use_cp"] or flags["use_conv_cp"]
              or ("disable_conv_cp" in args and not flags["disable_conv_cp"]))
    opts = Options(dropout=dropout if algo == "lora" else 0.0, rank_dropout=values.get("rank_dropout", 0.0),
                   module_dropout=values.get("module_dropout", 0.0), dora=flags["dora_wd"],
                   dora_on_output=on_output, tucker=tucker, factor=int(values.get("factor", -1)),
                   decompose_both=flags["decompose_both"], full_matrix=flags["full_matrix"])
    return NetworkSpec(module, algo, conv_dim, conv_alpha, opts, dict(args), cfg.network_dim, cfg.network_alpha,
                       cfg.component_lrs(), tuple(notes), cfg.network_weights if cfg.dim_from_weights else "")


def problems(cfg) -> list:
    try:
        spec(cfg)
    except NetworkArgsError as e:
        return [str(e)]
    return []
