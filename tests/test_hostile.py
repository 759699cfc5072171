"""Hostile input, case by case: each is refused with exit code 2 and one message saying what to fix, no
traceback, no file written, every input byte-identical afterwards. The cases are a table: a new one is a
line. (Faults — kill -9, Ctrl-C, a full disk — are in test_faults.py.)"""
import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_model
from lora_ext import cli, files
from random_networks import make_random_lora
from lora_ext import sample_data, tiny


class Evil:
    """A pickle that would run a command when loaded; it must never be."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/lora_ext_pwned",))


def _header_file(path, header: bytes, body: bytes = b""):
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + body)


# LyCORIS files whose shapes lie, one module each; every other module of the file is sound
LIES = {"loha_0d": ("loha", "hada_w1_a", lambda t: t.flatten()[0]),
        "loha_1d": ("loha", "hada_w1_a", lambda t: t.flatten()),
        "loha_product": ("loha", "hada_w2_b", lambda t: torch.randn(t.shape[0], t.shape[1] + 3)),
        "glora_0d": ("glora", "a1.weight", lambda t: t.flatten()[0]),
        "lokr_ranks": ("lokr", "lokr_w2_b", lambda t: torch.randn(t.shape[0] + 1, *t.shape[1:]))}
LIE = "shapes do not form a|GLoRA factors are matrices|disagree on the rank"


def _lying_lycoris(model, j):
    from random_networks import make_random_network

    for name, (network, part, lie) in LIES.items():
        tensors = files.kohya_tensors(make_random_network(model, network, seed=6))
        key = next(k for k in sorted(tensors) if k.endswith("." + part))
        tensors[key] = lie(tensors[key]).contiguous()
        save_file(tensors, j(f"lie_{name}.safetensors"))
    # a LoCon whose Tucker core (lora_mid) is of another rank than its factors
    tensors = files.kohya_tensors(make_random_lora(model, seed=6))
    down = next(k for k in sorted(tensors) if k.endswith("lora_down.weight") and tensors[k].shape[-1] == 3)
    rank, inp = tensors[down].shape[:2]
    tensors[down] = torch.randn(rank, inp, 1, 1)
    tensors[down.replace("lora_down", "lora_mid")] = torch.randn(rank + 2, rank, 3, 3)
    save_file(tensors, j("lie_locon_tucker.safetensors"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The inputs every case may use, in one folder (hashed before and after each case), and an empty
    output folder."""
    root = tmp_path_factory.mktemp("hostile")
    w = {k: str(root / k) for k in ("in", "out")}
    os.makedirs(w["in"]), os.makedirs(w["out"])
    j = lambda name: os.path.join(w["in"], name)  # noqa: E731
    model = tiny_model("sd1")
    tiny.save_checkpoint(model, j("base.safetensors"))
    lora = make_random_lora(model, seed=3)
    files.write_kohya(j("lora.safetensors"), files.kohya_tensors(lora), {})
    files.write_kohya(j("lora2.safetensors"), files.kohya_tensors(make_random_lora(model, seed=4)), {})
    files.write_kohya(j("lora_sd2.safetensors"), files.kohya_tensors(make_random_lora(tiny_model("sd2"), seed=5)), {})
    good = files.kohya_tensors(lora)
    nan = dict(good)
    key = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[key] = torch.full_like(nan[key], float("nan"))
    save_file(nan, j("nan.safetensors"))
    wide = dict(good)          # the same names, other widths: a LoRA for a model of other sizes
    key = next(k for k in wide if k.endswith("proj_in.lora_down.weight"))
    wide[key] = torch.randn(wide[key].shape[0], wide[key].shape[1] * 2, *wide[key].shape[2:])
    save_file(wide, j("wide.safetensors"))
    open(j("empty.pt"), "wb").close()
    open(j("empty.safetensors"), "wb").close()
    with open(j("text.safetensors"), "w") as f:
        f.write("these are not the tensors you are looking for\n" * 10)
    with open(j("lora.safetensors"), "rb") as f:
        whole = f.read()
    with open(j("truncated.safetensors"), "wb") as f:
        f.write(whole[: len(whole) // 2])
    _header_file(j("nested.safetensors"), b"[" * 100_000 + b"]" * 100_000)
    _header_file(j("lying.safetensors"), json.dumps(
        {"a.lora_up.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode(), b"\0" * 8)
    with open(j("claims.safetensors"), "wb") as f:
        f.write((10 ** 12).to_bytes(8, "little") + b"{}")
    torch.save({"lora_unet_x.lora_up.weight": Evil()}, j("evil.pt"))        # a zip, as torch writes them
    with open(j("evil.ckpt"), "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f, protocol=2)            # a bare pickle, as old tools did
    save_file({"foo.weight": torch.ones(2, 2), "bar": torch.zeros(3)}, j("notlora.safetensors"))
    _lying_lycoris(model, j)
    huge = {k: (torch.tensor(1e14) if k.endswith(".alpha") else v) for k, v in good.items()}
    save_file(huge, j("huge_alpha.safetensors"))
    os.mkfifo(j("fifo.safetensors"))
    os.mkdir(j("folder.safetensors"))
    with open(j("file_not_dir"), "w") as f:
        f.write("x")
    data = sample_data.make_sample_dataset(j("data"), size=64, per_concept=2)
    w["train"] = data["train"]
    for name in ("nofolders", "zero", "corrupt"):
        os.makedirs(j(name))
    os.makedirs(j("zero/0_cat"))
    os.makedirs(j("corrupt/5_cat"))
    for i in range(2):
        with open(j(f"corrupt/5_cat/{i}.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not really")
    os.symlink(j("lora.safetensors"), j("link_to_lora.safetensors"))
    os.link(j("lora.safetensors"), j("hardlink_to_lora.safetensors"))
    w.update(dir=w["in"])
    return w


def _fingerprint(folder):
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[os.path.relpath(path, folder)] = "special"
        out.update({os.path.relpath(os.path.join(dirpath, d), folder) + "/": "dir" for d in dirnames})
    return out


T = "train --pretrained_model_name_or_path tiny-sd1 --train_data_dir {train} --output_dir {out} --resolution 64"
M = "merge --model {dir}/base.safetensors --out {out}/m.safetensors --lora"
CASES = [
    # --- numbers that are not numbers (merge ratios) ---
    ("ratio nan", M + " {dir}/lora.safetensors:nan", "finite number"),
    ("ratio inf", M + " {dir}/lora.safetensors:inf", "finite number"),
    ("ratio -inf", M + " {dir}/lora.safetensors:-inf", "finite number"),
    ("ratio 1e309", M + " {dir}/lora.safetensors:1e309", "finite number"),
    ("ratio 1e5", M + " {dir}/lora.safetensors:1e5", "from -100 to 100"),
    ("te ratio nan", M + " {dir}/lora.safetensors:1:nan", "finite number"),
    ("ratio abc", M + " {dir}/lora.safetensors:abc", "ratio 'abc' is not a number"),
    ("ratio empty", M + " {dir}/lora.safetensors:", "ratio '' is not a number"),
    ("ratio 1:abc", M + " {dir}/lora.safetensors:abc:1", "ratio 'abc' is not a number"),
    # --- numbers that are not numbers (training) ---
    ("steps -5", T + " --max_train_steps -5", r"max_train_steps = -5 is out of range"),
    ("steps 0", T + " --max_train_steps 0", r"max_train_steps = 0 is out of range"),
    ("steps 1.5", T + " --max_train_steps 1.5", "max_train_steps = '1.5' is not a whole number"),
    ("steps nan", T + " --max_train_steps nan", "is not a whole number"),
    ("steps 1e309", T + " --max_train_steps 1e309", "is not a whole number"),
    ("batch 0", T + " --train_batch_size 0", r"train_batch_size = 0 is out of range"),
    ("batch -1", T + " --train_batch_size -1", r"train_batch_size = -1 is out of range"),
    ("lr -1", T + " --learning_rate -1", r"learning_rate = -1 is out of range"),
    ("lr nan", T + " --learning_rate nan", "learning_rate = nan is not a finite number"),
    ("lr inf", T + " --learning_rate inf", "learning_rate = inf is not a finite number"),
    ("lr abc", T + " --learning_rate abc", "learning_rate = 'abc' is not a number"),
    ("unet lr nan", T + " --unet_lr nan", "unet_lr = nan is not a finite number"),
    ("te lr -1", T + " --text_encoder_lr -1", "text_encoder_lr = -1 is out of range"),
    ("dim 0", T + " --network_dim 0", "network_dim = 0 is out of range"),
    ("dim -4", T + " --network_dim -4", "network_dim = -4 is out of range"),
    ("dim 1e9", T + " --network_dim 1e9", "network_dim = 1e.09 is out of range|network_dim = 1e\\+09 is out of range"),
    ("alpha -1", T + " --network_alpha -1", "network_alpha = -1 is out of range"),
    ("alpha nan", T + " --network_alpha nan", "network_alpha = nan is not a finite number"),
    ("resolution 0", T.replace("--resolution 64", "--resolution 0"), "each side is a multiple of 8"),
    ("resolution abc", T.replace("--resolution 64", "--resolution abc"), "is not a number or 'width,height'"),
    ("resolution 63", T.replace("--resolution 64", "--resolution 63"), "multiple of 8"),
    ("resolution -512", T.replace("--resolution 64", "--resolution=-512"), "not a number or 'width,height'"),
    ("accumulation 0", T + " --gradient_accumulation_steps 0", "gradient_accumulation_steps = 0 is out of range"),
    ("warmup -1", T + " --lr_warmup_steps -1", "lr_warmup_steps = -1 is out of range"),
    ("seed -1", T + " --seed -1", "seed = -1 is out of range"),
    ("caption dropout 1.5", T + " --caption_dropout_rate 1.5", "caption_dropout_rate = 1.5 is out of range"),
    ("dropout 1", T + " --network_dropout 1", "network_dropout = 1 is out of range"),
    ("noise offset nan", T + " --noise_offset nan", "noise_offset = nan is not a finite number"),
    ("min snr -1", T + " --min_snr_gamma -1", "min_snr_gamma = -1 is out of range"),
    ("clip skip 0", T + " --clip_skip 0", "clip_skip = 0 is out of range"),
    ("token length 100", T + " --max_token_length 100", "max_token_length must be 75, 150 or 225"),
    ("cycles 0", T + " --lr_scheduler_num_cycles 0", "lr_scheduler_num_cycles = 0 is out of range"),
    ("epochs -1", T + " --max_train_epochs -1", "max_train_epochs = -1 is out of range"),
    ("save every -1", T + " --save_every_n_steps -1", "save_every_n_steps = -1 is out of range"),
    ("keep tokens -1", T + " --keep_tokens -1", "keep_tokens = -1 is out of range"),
    ("buckets crossed", T + " --min_bucket_reso 2048 --max_bucket_reso 512", "min_bucket_reso is larger"),
    ("prior weight nan", T + " --prior_loss_weight nan", "prior_loss_weight = nan is not a finite number"),
    ("grad norm inf", T + " --max_grad_norm inf", "max_grad_norm = inf is not a finite number"),
    ("conv_dim 0", T + " --network_args conv_dim=0", "network_args conv_dim = 0 is out of range"),
    ("conv_dim abc", T + " --network_args conv_dim=abc", "conv_dim='abc' is not a whole number"),
    ("conv_alpha nan", T + " --network_args conv_dim=4 conv_alpha=nan", "conv_alpha = nan is not a finite number"),
    ("net arg not k=v", T + " --network_args conv_dim", "is not key=value"),
    ("rank dropout 2", T + " --network_args rank_dropout=2", "rank_dropout = 2 is out of range"),
    ("net arg unknown", T + " --network_args colour=red", "network_args not supported: colour"),
    ("lycoris arg, kohya module", T + " --network_args algo=loha", "algo: LyCORIS options; add --network_module lycoris.kohya"),
    ("algo not trained", T + " --network_module lycoris.kohya --network_args algo=ia3", "algo=ia3: IA3 is not trained"),
    ("algo unknown", T + " --network_module lycoris.kohya --network_args algo=lolo", "algo='lolo' is not a LyCORIS"),
    ("lycoris option not trained", T + " --network_module lycoris.kohya --network_args use_scalar=True",
     "use_scalar: LyCORIS options lora_ext does not train"),
    ("network module unknown", T + " --network_module networks.dylora", "network_module 'networks.dylora'"),
    ("lokr factor 0", T + " --network_module lycoris.kohya --network_args algo=lokr factor=0", "factor = 0"),
    ("flag not bool", T + " --network_module lycoris.kohya --network_args dora_wd=maybe", "dora_wd='maybe' is not true or false"),
    ("scheduler unknown", T + " --lr_scheduler nope --max_train_steps 1", "nope"),
    ("bool not bool", T + " --config {dir}/bool.toml", "is not true or false"),
    ("toml nan", T + " --config {dir}/nan.toml", "learning_rate = nan is not a finite number"),
    ("toml broken", T + " --config {dir}/broken.toml", "not valid TOML"),
    ("toml missing", T + " --config {dir}/missing.toml", "no such config file"),
    # --- resize / merge-loras / extract numbers ---
    ("resize rank 0", "resize {dir}/lora.safetensors --out {out}/r.safetensors --rank 0", "rank must be a whole number"),
    ("resize rank -1", "resize {dir}/lora.safetensors --out {out}/r.safetensors --rank -1", "rank must be a whole"),
    ("resize energy 2", "resize {dir}/lora.safetensors --out {out}/r.safetensors --energy 2", "at most 1"),
    ("resize energy 0", "resize {dir}/lora.safetensors --out {out}/r.safetensors --energy 0", "more than 0"),
    ("resize energy nan", "resize {dir}/lora.safetensors --out {out}/r.safetensors --energy nan", "at most 1"),
    ("resize both", "resize {dir}/lora.safetensors --out {out}/r.safetensors --rank 2 --energy 0.5", "give --rank"),
    ("resize neither", "resize {dir}/lora.safetensors --out {out}/r.safetensors", "give --rank"),
    ("merge-loras rank 0", "merge-loras --lora {dir}/lora.safetensors --out {out}/r.safetensors --rank 0", "rank must"),
    ("merge-loras nan", "merge-loras --lora {dir}/lora.safetensors:nan --out {out}/r.safetensors", "finite number"),
    ("merge-loras models", "merge-loras --lora {dir}/lora.safetensors --lora {dir}/lora_sd2.safetensors "
                           "--out {out}/r.safetensors", "SD2|different models"),
    ("extract rank 0", "extract --base {dir}/base.safetensors --tuned {dir}/base.safetensors --rank 0 "
                       "--out {out}/r.safetensors", "rank must be a whole number"),
    ("extract conv -1", "extract --base {dir}/base.safetensors --tuned {dir}/base.safetensors --conv_rank -1 "
                        "--out {out}/r.safetensors", "conv rank must be a whole number"),
    # --- outputs that are inputs ---
    ("merge out=lora", "merge --model {dir}/base.safetensors --lora {dir}/lora.safetensors "
                       "--out {dir}/lora.safetensors --overwrite", "is one of the inputs"),
    ("merge out=base", "merge --model {dir}/base.safetensors --lora {dir}/lora.safetensors "
                       "--out {dir}/base.safetensors --overwrite", "is one of the inputs"),
    ("merge out=hardlink", "merge --model {dir}/base.safetensors --lora {dir}/lora.safetensors "
                           "--out {dir}/hardlink_to_lora.safetensors --overwrite", "is one of the inputs"),
    ("merge out=symlink", "merge --model {dir}/base.safetensors --lora {dir}/lora.safetensors "
                          "--out {dir}/link_to_lora.safetensors --overwrite", "is one of the inputs"),
    ("resize out=in", "resize {dir}/lora.safetensors --out {dir}/lora.safetensors --rank 2 --overwrite",
     "is one of the inputs"),
    ("merge-loras out=in", "merge-loras --lora {dir}/lora.safetensors --lora {dir}/lora2.safetensors "
                           "--out {dir}/lora2.safetensors --overwrite", "is one of the inputs"),
    ("extract out=base", "extract --base {dir}/base.safetensors --tuned {dir}/base.safetensors "
                         "--out {dir}/base.safetensors --overwrite", "is one of the inputs|ends in .safetensors"),
    ("train out=weights", T + " --output_dir {dir} --output_name lora --network_weights {dir}/lora.safetensors "
                          "--overwrite", "network_weights file it starts from"),
    ("merge out exists", "merge --model {dir}/base.safetensors --lora {dir}/lora.safetensors "
                         "--out {dir}/lora2.safetensors", "exists"),
    ("train out exists", T + " --output_dir {dir} --output_name lora", "exists; choose another output_name"),
    # --- output names and folders ---
    ("name ../n", T + " --output_name ../n", "must be a plain file name"),
    ("name /abs", T + " --output_name /tmp/x", "must be a plain file name"),
    ("name a/b", T + " --output_name a/b", "must be a plain file name"),
    ("name .hidden", T + " --output_name .hidden", "must be a plain file name"),
    ("name empty", T + " --output_name=", "must be a plain file name"),
    ("output_dir file", T.replace("--output_dir {out}", "--output_dir {dir}/file_not_dir"), "is a file, not a folder"),
    ("output_dir under file", T.replace("--output_dir {out}", "--output_dir {dir}/file_not_dir/sub"),
     "is a file, not a folder"),
    ("merge out .txt", "merge --model {dir}/base.safetensors --lora {dir}/lora.safetensors --out {out}/m.txt",
     "ends in .safetensors"),
    # --- files that lie about themselves (inspect) ---
    ("inspect empty .pt", "inspect {dir}/empty.pt", "empty"),
    ("inspect empty st", "inspect {dir}/empty.safetensors", "too short"),
    ("inspect text", "inspect {dir}/text.safetensors", "header claims|not valid JSON"),
    ("inspect truncated", "inspect {dir}/truncated.safetensors", "truncated"),
    ("inspect nested", "inspect {dir}/nested.safetensors", "nests JSON deeper"),
    ("inspect lying offsets", "inspect {dir}/lying.safetensors", "outside the data section"),
    ("inspect claims 1 TB", "inspect {dir}/claims.safetensors", "header claims"),
    ("inspect pickle code", "inspect {dir}/evil.pt", r"pickled objects other than tensors \(posix.system\)"),
    ("inspect nan", "inspect {dir}/nan.safetensors", "NaN or Inf"),
    ("inspect fifo", "inspect {dir}/fifo.safetensors", "not a regular file"),
    ("inspect folder", "inspect {dir}/folder.safetensors", "is a folder"),
    ("inspect not lora", "inspect {dir}/notlora.safetensors", "no LoRA keys found"),
    ("inspect missing", "inspect {dir}/missing.safetensors", "no such file"),
    ("inspect .txt", "inspect {dir}/file_not_dir", "unknown file type"),
    ("inspect --model sd9", "inspect {dir}/lora.safetensors --model sd9", "give sd1, sd2, sdxl"),
    # --- LyCORIS files whose shapes lie: refused when read, by every tool ---
    *[(f"{tool} lie {lie}", command.replace("LIE", f"{{dir}}/lie_{lie}.safetensors"), LIE)
      for lie in ("loha_0d", "loha_1d", "loha_product", "glora_0d", "lokr_ranks", "locon_tucker")
      for tool, command in (("inspect", "inspect LIE"), ("merge", "merge --model {dir}/base.safetensors --lora LIE "
                                                         "--out {out}/m.safetensors"),
                            ("resize", "resize LIE --out {out}/r.safetensors --rank 2"),
                            ("merge-loras", "merge-loras --lora LIE --lora {dir}/lora.safetensors --out {out}/r.safetensors"),
                            ("train", "train --pretrained_model_name_or_path tiny-sd1 --train_data_dir {train} "
                                      "--output_dir {out} --resolution 64 --network_weights LIE"))],
    ("resize fp16 inf", "resize {dir}/huge_alpha.safetensors --out {out}/r.safetensors --rank 2",
     "beyond fp16's range .* save as fp32 \\(--precision fp32\\); nothing was written"),
    ("merge-loras fp16 inf", "merge-loras --lora {dir}/huge_alpha.safetensors --out {out}/r.safetensors",
     "beyond fp16's range"),
    # --- merge inputs ---
    ("merge base is lora", "merge --model {dir}/lora.safetensors --lora {dir}/lora2.safetensors "
                           "--out {out}/m.safetensors", "not a Stable Diffusion checkpoint"),
    ("merge base missing", "merge --model {dir}/missing.safetensors --lora {dir}/lora.safetensors "
                           "--out {out}/m.safetensors", "no such checkpoint"),
    ("merge base truncated", "merge --model {dir}/truncated.safetensors --lora {dir}/lora.safetensors "
                             "--out {out}/m.safetensors", "truncated"),
    ("merge base pickle", "merge --model {dir}/evil.ckpt --lora {dir}/lora.safetensors --out {out}/m.safetensors",
     "pickled objects other than tensors"),
    ("merge lora pickle", M + " {dir}/evil.pt", "pickled objects other than tensors"),
    ("merge lora nan", M + " {dir}/nan.safetensors", "NaN or Inf"),
    ("merge lora other model", M + " {dir}/lora_sd2.safetensors", "SD2"),
    ("merge lora fifo", M + " {dir}/fifo.safetensors", "not a regular file"),
    ("merge lora other sizes", M + " {dir}/wide.safetensors", "made for another model"),
    ("merge-loras sizes", "merge-loras --lora {dir}/lora.safetensors --lora {dir}/wide.safetensors "
                          "--out {out}/r.safetensors", "are for different models"),
    # --- training inputs ---
    ("train checkpoint pickle", T.replace("tiny-sd1", "{dir}/evil.ckpt"), "pickled objects other than tensors"),
    ("train checkpoint truncated", T.replace("tiny-sd1", "{dir}/truncated.safetensors"), "truncated"),
    ("train checkpoint is lora", T.replace("tiny-sd1", "{dir}/lora.safetensors"), "not a Stable Diffusion checkpoint"),
    ("train checkpoint missing", T.replace("tiny-sd1", "{dir}/missing.safetensors"), "no such checkpoint"),
    ("train no model", T.replace("--pretrained_model_name_or_path tiny-sd1 ", ""), "is required"),
    ("train data missing", T.replace("{train}", "{dir}/missing"), "does not exist"),
    ("train data is file", T.replace("{train}", "{dir}/file_not_dir"), "does not exist"),
    ("train no concepts", T.replace("{train}", "{dir}/nofolders"), "no trainable images"),
    ("train 0 repeats", T.replace("{train}", "{dir}/zero"), "0 repeats"),
    ("train corrupt images", T.replace("{train}", "{dir}/corrupt"), "cannot be read as an image"),
    ("train reg missing", T + " --reg_data_dir {dir}/missing", "regularization folder"),
    ("train resume not state", T + " --resume {dir}/lora.safetensors", "not a lora_ext training state"),
    ("train network_weights nan", T + " --network_weights {dir}/nan.safetensors", "NaN or Inf"),
    # --- kohya command lines ---
    ("kohya unsupported", T + " --fp8_base", "fp8_base: lora_ext does not do this yet"),
    ("vae is a lora", T + " --vae {dir}/lora.safetensors", "it lacks .* give a VAE file"),
    ("unknown option", T + " --bogus_option 3", "unknown options: bogus_option"),
    ("abbreviation", T + " --xform", "unknown options: xform"),
]


def _argv(template, world):
    return [part.format(**world) for part in template.split(" ")]


@pytest.fixture(scope="module")
def tomls(world):
    for name, text in (("bool.toml", 'xformers = "maybe"\n'), ("nan.toml", "learning_rate = nan\n"),
                       ("broken.toml", "learning_rate = = 1\n")):
        with open(os.path.join(world["dir"], name), "w") as f:
            f.write(text)
    return world


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_refuses(case, world, tomls, capsys):
    import re

    _, template, pattern = case
    before = _fingerprint(world["dir"])
    rc = cli.main(_argv(template, world))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert "Traceback" not in err and "\x1b[" not in err
    assert _fingerprint(world["dir"]) == before           # no input changed, nothing written beside them
    assert os.listdir(world["out"]) == []                 # nothing written where outputs go
    assert not os.path.exists("/tmp/lora_ext_pwned")


def test_the_case_table_has_no_duplicates():
    assert len({c[0] for c in CASES}) == len(CASES) and len({c[1] for c in CASES}) == len(CASES)


# --- what kohya users bring, and what must be accepted -------------------------------------------------

def test_kohya_options_without_meaning_here_run_with_one_note_each(world, tmp_path, capsys):
    argv = _argv(T, {**world, "out": str(tmp_path)}) + [
        "--max_train_steps", "1", "--network_dim", "2", "--caption_extension", ".txt", "--lowram",
        "--max_data_loader_n_workers", "0", "--persistent_data_loader_workers", "--tokenizer_cache_dir", "/nowhere"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    for option in ("lowram", "max_data_loader_n_workers", "persistent_data_loader_workers", "tokenizer_cache_dir"):
        assert err.count(f"note: --{option} has no effect here") == 1, err
    assert os.path.isfile(tmp_path / "last.safetensors")


def test_kohya_defaults_mean_what_they_mean_in_kohya():
    from lora_ext.train.config import GUIDE_DEFAULTS, TrainConfig, from_dict

    cfg = from_dict({})
    assert (cfg.caption_extension, cfg.lr_scheduler, cfg.mixed_precision, cfg.network_dim, cfg.network_alpha,
            cfg.save_precision, cfg.max_train_steps, cfg.max_train_epochs, cfg.learning_rate, cfg.output_name) == \
        (".caption", "constant", "no", 4, 1.0, "fp32", 1600, 0, 2e-6, "last")
    guide = TrainConfig(**GUIDE_DEFAULTS)        # the tab starts from the guide's values
    assert (guide.network_dim, guide.lr_scheduler, guide.max_train_epochs, guide.caption_extension) == \
        (128, "cosine_with_restarts", 10, ".txt")


def test_epochs_win_over_steps_as_in_kohya(world):
    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.train.config import from_dict
    from lora_ext.train.loop import prepare_data, schedule

    host = WebuiHost(tiny_model("sd1"))
    for options, want in (({"max_train_steps": 3}, 3), ({"max_train_steps": 3, "max_train_epochs": 2}, None)):
        cfg = from_dict({"train_data_dir": world["train"], "resolution": "64", **options})
        scan, _ = prepare_data(host, cfg)
        plan, per_epoch, total, _ = schedule(scan, cfg)
        assert total == (want if want is not None else 2 * per_epoch)


def test_a_checkpoint_without_constant_buffers_loads(tmp_path):
    """Current transformers (and kohya's merges) save no text-encoder position_ids."""
    from safetensors.torch import load_file, save_file

    from lora_ext.hosts.checkpoint import load_checkpoint

    path = str(tmp_path / "nopos.safetensors")
    tiny.save_checkpoint(tiny_model("sd1"), path)
    sd = load_file(path)
    dropped = [k for k in sd if k.endswith("position_ids")]
    assert dropped
    save_file({k: v for k, v in sd.items() if k not in dropped}, path)
    model = load_checkpoint(path)
    ids = dict(model.named_buffers())
    assert any(k.endswith("position_ids") for k in ids)


def test_a_narrow_text_encoder_without_a_heads_hint_loads(tmp_path):
    import yaml

    from lora_ext.hosts.checkpoint import load_checkpoint

    path = str(tmp_path / "narrow.safetensors")
    yaml_path = tiny.save_checkpoint(tiny_model("sd1"), path)
    with open(yaml_path) as f:
        config = yaml.safe_load(f)
    config["model"]["params"]["cond_stage_config"]["params"].pop("lora_ext_heads", None)
    with open(yaml_path, "w") as f:
        yaml.safe_dump(config, f)
    model = load_checkpoint(path)           # 32 wide: was a ZeroDivisionError in the heads guess
    assert model is not None


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    from lora_ext.atomic import atomic_write

    old = os.umask(umask)
    try:
        atomic_write(str(tmp_path / "x.bin"), b"data")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "x.bin").st_mode & 0o777 == mode


def test_stale_temp_files_of_dead_processes_go_and_live_ones_stay(tmp_path):
    from lora_ext.atomic import TEMP_PREFIX, atomic_write

    dead = subprocess_pid_that_ended()
    (tmp_path / f"{TEMP_PREFIX}{dead}-abc-x.safetensors").write_bytes(b"half")
    (tmp_path / f"{TEMP_PREFIX}{os.getppid()}-abc-x.safetensors").write_bytes(b"someone writing")
    (tmp_path / ".tmp-not-ours").write_bytes(b"keep")
    atomic_write(str(tmp_path / "y.bin"), b"data")
    assert sorted(os.listdir(tmp_path)) == sorted([f"{TEMP_PREFIX}{os.getppid()}-abc-x.safetensors", ".tmp-not-ours",
                                                   "y.bin"])


def subprocess_pid_that_ended() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cli_training_prints_skipped_images_and_reads_utf16_captions(world, tmp_path, capsys):
    from lora_ext.train.dataset import scan

    data = tmp_path / "data" / "3_cat"
    data.mkdir(parents=True)
    src = os.path.join(world["train"], sorted(os.listdir(world["train"]))[0])
    images = [n for n in sorted(os.listdir(src)) if n.endswith(".png")]
    shutil.copy(os.path.join(src, images[0]), data / "good.png")
    (data / "good.txt").write_bytes("чёрный кот, 猫".encode("utf-16"))
    (data / "bad.png").write_bytes(b"not an image")
    found = scan(str(tmp_path / "data"))
    assert [i.caption for i in found.items] == ["чёрный кот, 猫"]
    argv = _argv(T, {**world, "train": str(tmp_path / "data"), "out": str(tmp_path / "o")}) + [
        "--max_train_steps", "1", "--network_dim", "2", "--caption_extension", ".txt"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"skipped {data / 'bad.png'}: cannot be read as an image" in err


def test_a_file_for_another_layout_is_counted_as_it_is_and_resized_whole(tmp_path, capsys):
    """A LoRA of a model with other blocks (here: the tiny UNet's names that the full SD1 lacks): inspect
    counts what the file holds and names what would not apply; resize keeps every module."""
    model = tiny_model("sd1")
    path = str(tmp_path / "other.safetensors")
    modules = make_random_lora(model, seed=1)
    extra = {k.replace("down_blocks_0", "down_blocks_9"): v
             for k, v in make_random_lora(model, seed=2).items() if "down_blocks_0" in k}
    files.write_kohya(path, files.kohya_tensors({**modules, **extra}), {})
    lora = files.read(path)
    held = lora.file_counts()
    assert held["unet"] + held["te"] == len(modules) + len(extra) and lora.counts()["unet"] < held["unet"]
    assert cli.main(["inspect", path]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["modules"] == held and "fit no layer of a standard SD1 model" in captured.err
    out = str(tmp_path / "r.safetensors")
    assert cli.main(["resize", path, "--rank", "2", "--out", out]) == 0
    assert files.read(out).file_counts() == held


# --- the tab's handlers: the same classes through the UI; a message, never an exception -----------------

@pytest.fixture(scope="module")
def tab(world, tmp_path_factory):
    """A LoRA folder and a checkpoint folder holding the world's files (the bad ones included)."""
    from lora_ext.library import LoraLibrary

    root = tmp_path_factory.mktemp("tab")
    loras, ckpts = root / "Lora", root / "Stable-diffusion"
    loras.mkdir(), ckpts.mkdir()
    for name in os.listdir(world["dir"]):
        src = os.path.join(world["dir"], name)
        if os.path.isfile(src) and not os.path.islink(src) and name.endswith((".safetensors", ".pt", ".ckpt")):
            shutil.copy(src, loras / name)
    os.mkfifo(loras / "fifo2.safetensors")
    shutil.copy(os.path.join(world["dir"], "base.safetensors"), ckpts / "base.safetensors")
    shutil.copy(os.path.join(world["dir"], "base.yaml"), ckpts / "base.yaml")
    return {"loras": str(loras), "ckpts": str(ckpts), "lib": LoraLibrary(lambda: [str(loras)])}


def _merge(t, lines, out="m", base="base.safetensors", overwrite=False):
    from lora_ext.ui import merge_tab
    return merge_tab.merge(t["ckpts"], t["lib"], base, lines, out, "fp16", overwrite)


def _merge_loras(t, lines, rank=0, out="r"):
    from lora_ext.ui import merge_tab
    return merge_tab.merge_loras(t["loras"], t["lib"], lines, rank, out, "fp16", False)[0]


def _resize(t, name, how, amount, out="r", overwrite=False):
    from lora_ext.ui import merge_tab
    return merge_tab.resize(t["loras"], t["lib"], name, how, amount, out, "fp16", overwrite)[0]


def _extract(t, rank, conv, out="r"):
    from lora_ext.ui import merge_tab
    return merge_tab.extract(t["ckpts"], t["loras"], "base.safetensors", "base.safetensors", rank, conv, out, "fp16",
                             False)[0]


def _inspect(t, name):
    from lora_ext.ui import inspect_tab
    return inspect_tab.inspect_file(t["loras"], name)[0]


OUTSIDE = "outside|not a name inside|not in the LoRA folders"
TAB_CASES = [
    ("merge nan", lambda t: _merge(t, "lora.safetensors:nan"), "finite number"),
    ("merge inf te", lambda t: _merge(t, "lora.safetensors:1:inf"), "finite number"),
    ("merge abc", lambda t: _merge(t, "lora.safetensors:abc:1"), "is not a number"),
    ("merge ../ lora", lambda t: _merge(t, "../Stable-diffusion/base.safetensors"), OUTSIDE),
    ("merge abs lora", lambda t: _merge(t, "/etc/passwd"), OUTSIDE),
    ("merge ../ out", lambda t: _merge(t, "lora.safetensors", out="../../x"), OUTSIDE),
    ("merge abs out", lambda t: _merge(t, "lora.safetensors", out="/tmp/x"), OUTSIDE),
    ("merge out=base", lambda t: _merge(t, "lora.safetensors", out="base", overwrite=True), "one of the inputs"),
    ("merge ../ base", lambda t: _merge(t, "lora.safetensors", base="../Lora/lora.safetensors"), OUTSIDE),
    ("merge no base", lambda t: _merge(t, "lora.safetensors", base="nope.safetensors"), "no such"),
    ("merge nan file", lambda t: _merge(t, "nan.safetensors"), "NaN or Inf"),
    ("merge pickle", lambda t: _merge(t, "evil.pt"), "pickled objects other than tensors"),
    ("merge fifo", lambda t: _merge(t, "fifo2.safetensors"), "not in the LoRA folders|not a regular file"),
    ("merge other model", lambda t: _merge(t, "lora_sd2.safetensors"), "SD2"),
    ("merge empty name", lambda t: _merge(t, "lora.safetensors", out="  "), "give the new file a name"),
    ("merge-loras rank -1", lambda t: _merge_loras(t, "lora.safetensors", rank=-1), "whole number"),
    ("merge-loras rank None", lambda t: _merge_loras(t, "lora.safetensors", rank=None), "whole number"),
    ("merge-loras rank 2.5", lambda t: _merge_loras(t, "lora.safetensors", rank=2.5), "whole number"),
    ("merge-loras models", lambda t: _merge_loras(t, "lora.safetensors\nlora_sd2.safetensors"), "SD2|different"),
    ("merge-loras out=in", lambda t: _merge_loras(t, "lora.safetensors\nlora2.safetensors", out="lora2"), "exists|inputs"),
    ("resize rank 0", lambda t: _resize(t, "lora.safetensors", "rank", 0), "whole number of 1 or more"),
    ("resize rank None", lambda t: _resize(t, "lora.safetensors", "rank", None), "give the rank"),
    ("resize energy nan", lambda t: _resize(t, "lora.safetensors", "energy", float("nan")), "at most 1"),
    ("resize energy 5", lambda t: _resize(t, "lora.safetensors", "energy", 5), "at most 1"),
    ("resize out=in", lambda t: _resize(t, "lora.safetensors", "rank", 2, out="lora", overwrite=True), "one of the inputs"),
    ("resize ../", lambda t: _resize(t, "../Stable-diffusion/base.safetensors", "rank", 2), OUTSIDE),
    ("extract rank 0", lambda t: _extract(t, 0, 0), "whole number"),
    ("extract conv None", lambda t: _extract(t, 4, None), "whole number"),
    ("inspect empty pt", lambda t: _inspect(t, "empty.pt"), "empty"),
    ("inspect nested", lambda t: _inspect(t, "nested.safetensors"), "nests JSON"),
    ("inspect pickle", lambda t: _inspect(t, "evil.pt"), "pickled objects other than tensors"),
    ("inspect fifo", lambda t: _inspect(t, "fifo2.safetensors"), "not a regular file"),
    ("inspect ../", lambda t: _inspect(t, "../Stable-diffusion/base.safetensors"), OUTSIDE),
    ("inspect truncated", lambda t: _inspect(t, "truncated.safetensors"), "truncated"),
]


@pytest.mark.parametrize("case", TAB_CASES, ids=[c[0] for c in TAB_CASES])
def test_tab_handlers_answer_with_a_message(case, tab):
    import re

    _, call, pattern = case
    before = _fingerprint(os.path.dirname(tab["loras"]))
    message = call(tab)
    assert isinstance(message, str) and re.search(pattern, message), message
    assert message.startswith("**") and "Traceback" not in message and "\x1b[" not in message
    assert _fingerprint(os.path.dirname(tab["loras"])) == before
    assert not os.path.exists("/tmp/lora_ext_pwned")


FORM_CASES = [
    ("output_name", "../x", "must be a plain file name"),
    ("output_name", "/tmp/x", "must be a plain file name"),
    ("learning_rate", float("nan"), "not a finite number"),
    ("learning_rate", -1, "out of range"),
    ("train_batch_size", 0, "out of range"),
    ("network_dim", 0, "out of range"),
    ("unet_lr", "abc", "is not a number"),
    ("resolution", "64x", "multiple of 8|not a number"),
    ("max_train_epochs", -3, "out of range"),
    ("output_dir", "{file}", "is a file, not a folder"),
]


@pytest.mark.parametrize("field,value,pattern", FORM_CASES, ids=[f"{c[0]}={c[1]}" for c in FORM_CASES])
def test_the_training_form_refuses(field, value, pattern, world, tmp_path):
    import re

    from lora_ext.train.config import GUIDE_DEFAULTS, TrainConfig
    from lora_ext.ui import train_fields, train_tab

    if value == "{file}":
        value = os.path.join(world["dir"], "file_not_dir")
    cfg = TrainConfig(**dict(GUIDE_DEFAULTS, train_data_dir=world["train"], output_dir=str(tmp_path / "o")))
    values = train_fields.options_to_values(cfg)
    values[[f.name for f in train_fields.FIELDS].index(field)] = value
    result, message = train_tab.form_to_config(values)
    assert result is None and re.search(pattern, message) and message.startswith("**Check the form:**"), message
    assert not os.path.exists(tmp_path / "o")


# --- the HTTP routes (the webui's FastAPI app) ------------------------------------------------------------

ROUTE_CASES = [
    ("/lora_ext/v1/loras/../../etc/passwd", 404), ("/lora_ext/v1/loras/%2e%2e/%2e%2e/etc/passwd", 404),
    ("/lora_ext/v1/loras//etc/passwd", 404), ("/lora_ext/v1/loras/missing.safetensors", 404),
    ("/lora_ext/v1/loras/empty.pt", 422), ("/lora_ext/v1/loras/nested.safetensors", 422),
    ("/lora_ext/v1/loras/evil.pt", 422), ("/lora_ext/v1/loras/fifo2.safetensors", 404),
    ("/lora_ext/v1/loras/nan.safetensors", 422), ("/lora_ext/v1/loras/truncated.safetensors", 422),
]


@pytest.fixture(scope="module")
def client(tab):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_ext.panel.api import add_routes

    app = FastAPI()
    add_routes(app, tab["lib"], lambda name: "")
    return TestClient(app)


@pytest.mark.parametrize("route,status", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_routes_refuse_with_a_status_and_a_reason(route, status, client, tab):
    before = _fingerprint(os.path.dirname(tab["loras"]))
    answer = client.get(route)
    assert answer.status_code in ((status, 404) if status == 404 else (status,)), answer.text
    detail = answer.json().get("detail", "")
    assert detail and "Traceback" not in detail and tab["loras"] not in detail.replace(tab["loras"] + "/", "") or \
        answer.status_code == 404
    assert _fingerprint(os.path.dirname(tab["loras"])) == before


def test_the_list_route_survives_bad_files_in_the_folder(client):
    names = {entry["name"] for entry in client.get("/lora_ext/v1/loras").json()}
    assert {"lora.safetensors", "nan.safetensors", "evil.pt"} <= names


# --- the tab under a hurried user -------------------------------------------------------------------------

def test_a_cancel_clicked_while_train_is_still_starting_is_kept(world, tmp_path):
    import time

    from lora_ext.hosts.webui import WebuiHost
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train
    from lora_ext.ui.training_session import TrainingSession

    host = WebuiHost(tiny_model("sd1"))
    session = TrainingSession(lambda cfg, ev, stop: train(host, cfg, ev, stop))
    cfg = TrainConfig(train_data_dir=world["train"], output_dir=str(tmp_path), output_name="c", resolution="64",
                      caption_extension=".txt", max_train_steps=40, network_dim=2)
    clicked = time.time()
    session.cancel()            # the Cancel handler ran while Train's was still checking the dataset
    assert session.start(cfg, requested_at=clicked - 1e-6)
    session.wait(120)
    assert session.result.cancelled and session.result.steps == 0 and session.result.state_path
    # a Cancel from before the click (an earlier run's) does not stop the next one
    session2 = TrainingSession(lambda c, ev, stop: train(host, c, ev, stop))
    session2.cancel()
    cfg.max_train_steps, cfg.output_name = 2, "d"
    assert session2.start(cfg, requested_at=time.time() + 1)
    session2.wait(120)
    assert not session2.result.cancelled and session2.result.steps == 2


def test_a_handler_slower_than_5_s_answers_and_does_not_hold_up_others(tmp_path):
    """gradio 3.41's queue calls handlers through httpx: with a newer httpx than the webui's it gave up after
    5 s (the page showed a bare "Error" while the work went on), and with one worker (gradio's default) a
    long merge held the progress poll up for minutes. The slow handler runs until the fast one has answered
    (and at least 7 s): a queue that held the fast one behind it would never answer it, whatever the load."""
    import threading
    import time

    import gradio as gr
    from gradio_client import Client

    from conftest import free_port
    from lora_ext.ui.app import QUEUE_WORKERS

    fast_answered, slow_running = threading.Event(), threading.Event()

    def slow(x):
        slow_running.set()
        began = time.monotonic()
        fast_answered.wait(120)
        time.sleep(max(0.0, 7 - (time.monotonic() - began)))        # past the 5 s an old httpx gave up at
        return "slow " + x

    with gr.Blocks() as block:
        box, out = gr.Textbox(), gr.Textbox()
        gr.Button().click(slow, box, out)
        gr.Button().click(lambda x: "fast " + x, box, out)
    port = free_port()
    block.queue(concurrency_count=QUEUE_WORKERS).launch(server_name="127.0.0.1", server_port=port,
                                                       prevent_thread_lock=True)
    try:
        answers = {}
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        slow_call = threading.Thread(target=lambda: answers.__setitem__("slow", client.predict("a", fn_index=0)))
        slow_call.start()
        assert slow_running.wait(120)
        fast_call = threading.Thread(target=lambda: answers.__setitem__(
            "fast", Client(f"http://127.0.0.1:{port}/", verbose=False).predict("b", fn_index=1)))
        fast_call.start()
        fast_call.join(120)
        held = "fast" not in answers        # still waiting while the slow handler runs: held up behind it
        fast_answered.set()
        slow_call.join(120)
        assert not held and answers["fast"] == "fast b" and answers.get("slow") == "slow a"
    finally:
        fast_answered.set()
        block.close()


CONCEPT_CASES = [
    ("repeats inf", lambda w, d: [[w["concept"], "inf", "cat", ".txt", False]], None, "repeats must be a whole number"),
    ("repeats -3", lambda w, d: [[w["concept"], -3, "cat", ".txt", False]], None, "repeats must be a whole number"),
    ("repeats 0", lambda w, d: [[w["concept"], 0, "cat", ".txt", False]], None, "repeats must be a whole number"),
    ("repeats 1.5", lambda w, d: [[w["concept"], 1.5, "cat", ".txt", False]], None, "repeats must be a whole number"),
    ("repeats nan", lambda w, d: [[w["concept"], "nan", "cat", ".txt", False]], None, "repeats must be a whole number"),
    ("dest is the source", lambda w, d: [[w["concept"], 2, "cat", ".txt", False]], "{concept}/prepared", "an input"),
    ("dest holds the source", lambda w, d: [[w["concept"], 2, "cat", ".txt", False]], "{parent}", "not empty|an input"),
    ("source missing", lambda w, d: [[w["concept"] + "_nope", 2, "cat", ".txt", False]], None, "no such folder"),
]


@pytest.mark.parametrize("case", CONCEPT_CASES, ids=[c[0] for c in CONCEPT_CASES])
def test_concept_preparation_refuses(case, world, tmp_path):
    import re

    from lora_ext.ui import concepts_tab

    _, rows, dest, pattern = case
    concept = os.path.join(world["train"], sorted(os.listdir(world["train"]))[0])
    w = {"concept": concept, "parent": os.path.dirname(concept)}
    dest = dest.format(**w) if dest else str(tmp_path / "prepared")
    before = _fingerprint(world["dir"])
    message = concepts_tab.prepare(rows(w, dest), dest, "copy")
    message = message[0] if isinstance(message, tuple) else message
    assert re.search(pattern, str(message)), message
    assert _fingerprint(world["dir"]) == before and not os.path.exists(tmp_path / "prepared")


def test_inspect_of_a_file_whose_unet_part_fits_nothing_says_so_and_exits_2(tmp_path, capsys):
    model = tiny_model("sd1")
    modules = make_random_lora(model, seed=1)
    moved = {(k.replace("lora_unet_", "lora_unet_x_") if k.startswith("lora_unet_") else k): v
             for k, v in modules.items()}
    path = str(tmp_path / "te_fits.safetensors")
    files.write_kohya(path, files.kohya_tensors(moved), {})
    assert cli.main(["inspect", path]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)             # the report is still printed, for what it is worth
    assert report["modules_fitting_the_layout"]["unet"] == 0 and report["modules"]["unet"] > 0
    assert "none of them" in captured.err and "UNet" in captured.err


def test_a_long_merge_answers_at_once_and_the_poll_shows_progress_then_the_result(world, tab):
    """The Merge button's work runs as a Job: a merge that takes more than a second answers with a working
    line, the tab's poll shows how far it is, then its result, once."""
    import threading
    import time

    from lora_ext.ui import merge_tab
    from lora_ext.ui.jobs import Job

    reached, gate = threading.Event(), threading.Event()

    class HeldAtTensor3(Job):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            if name == "progress" and value.startswith("tensor 3 of"):
                reached.set()
                gate.wait(30)           # the merge waits here until the test has looked

    job = HeldAtTensor3("merge")
    work = lambda j: merge_tab.merge(tab["ckpts"], tab["lib"], "base.safetensors", "lora.safetensors:0.5",  # noqa
                                     "slow", "fp16", False, job=j)
    first = job.run(work, wait_s=0.2)
    assert reached.wait(60)                      # not a race with a slow machine: the merge is held here
    polled = job.poll()
    again = job.run(work)                        # a second click while it runs
    gate.set()
    deadline = time.time() + 60
    while job.running and time.time() < deadline:
        time.sleep(0.05)
    result, after = job.poll(), job.poll()
    assert first.startswith("Working on the merge") and polled.startswith("Working on the merge: tensor 3 of ")
    assert again.startswith("**Not now:** a merge is still running (tensor 3 of")
    assert result.startswith("Wrote **slow.safetensors**") and after is None
    for name in ("slow.safetensors", "slow.yaml"):
        os.remove(os.path.join(tab["ckpts"], name))
    assert Job("merge").run(lambda j: "done at once") == "done at once"      # quick work answers directly
