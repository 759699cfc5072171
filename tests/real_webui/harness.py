"""The real AUTOMATIC1111 webui for tests: a work copy of its source with the extension installed as users
install it, a tiny SD1 checkpoint, and a server process we start, wait for and stop.

Where things come from:
- the webui source: $LORA_EXT_WEBUI, else ../shared/a1111/webui beside this checkout;
- its helper repositories (ldm, sgm, k-diffusion, BLIP, assets; the launcher would clone them): the source's
  own repositories/, else $LORA_EXT_WEBUI_REPOS/<name>, else ~/.cache/lora_ext/webui-repos/<name>;
- its venv: $LORA_EXT_WEBUI_PYTHON, else the one .ci/webui-venv builds (cached, keyed on the requirements).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("LORA_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora_ext")
REPOSITORIES = ["stable-diffusion-stability-ai", "generative-models", "k-diffusion", "BLIP",
                "stable-diffusion-webui-assets"]
# the webui's own start-up flags for a CPU-only machine (../shared/a1111/NOTES.md)
FLAGS = ["--api", "--skip-torch-cuda-test", "--use-cpu", "all", "--precision", "full", "--no-half",
         "--no-half-vae", "--skip-prepare-environment", "--skip-version-check", "--no-download-sd-model",
         "--skip-install"]
# what a user's copy of the extension holds (a clone of the repository, without our test and dev files)
EXTENSION_IGNORE = shutil.ignore_patterns(".git", ".venv", "tests", "bench", "out", "demo_out", "presets",
                                          "lora_ext_ui", "__pycache__", "*.pyc", ".pytest_cache")
# the default live-preview method downloads a model at the first generation; there is no internet here
SETTINGS = {"show_progress_type": "Approx cheap"}
LBW_FOLDER = "sd-webui-lora-block-weight"
LBW_SETTINGS = "config-lbw.json"        # --ui-settings-file of a server with lora-block-weight enabled
CHECKPOINT = "tiny.safetensors"
OTHER_CHECKPOINT = "tiny_other.safetensors"
LORAS = {"alpha.safetensors": 1, "beta.safetensors": 2}
PLAIN_LORA = "plain.safetensors"    # a LoRA without conv layers (the 17 / 12-value block layouts' own case)
DORA = "dora.safetensors"       # a LoCon with DoRA magnitudes
# one file of each other type the built-in applies, random weights on every Linear / Conv layer (IA3 on the
# Linear ones: the built-in's IA3 cannot broadcast a per-channel factor over a conv kernel)
TYPE_FILES = {"loha": True, "lokr": True, "ia3": False, "oft": True, "boft": True, "glora_v1": False, "full": True,
              "norm": False}
# layers we read under their diffusers names that the built-in finds only under others (it converts no
# `conv_norm_out` or `final_layer_norm` name): left out of the files compared with it
BUILTIN_UNMAPPED = ("_conv_norm_out", "_final_layer_norm")


class Unavailable(Exception):
    """The tier cannot run on this machine; the message says what to provide."""


def webui_source() -> str:
    path = os.environ.get("LORA_EXT_WEBUI") or os.path.join(ROOT, "..", "shared", "a1111", "webui")
    if not os.path.isfile(os.path.join(path, "launch.py")):
        raise Unavailable("real-webui tier skipped: set LORA_EXT_WEBUI to a webui folder (or provide "
                          "../shared/a1111/webui) to run it")
    return os.path.abspath(path)


def repositories(source: str) -> dict:
    """{name: folder} of the helper repositories, or Unavailable naming the missing ones."""
    places = [os.path.join(source, "repositories"), os.environ.get("LORA_EXT_WEBUI_REPOS", ""),
              os.path.join(CACHE, "webui-repos")]
    found, missing = {}, []
    for name in REPOSITORIES:
        folder = next((os.path.join(p, name) for p in places if p and os.path.isdir(os.path.join(p, name))), None)
        if folder is None:
            missing.append(name)
        else:
            found[name] = folder
    if missing:
        raise Unavailable(f"real-webui tier skipped: the webui's helper repositories {', '.join(missing)} are not "
                          f"in {places[0]}; put them (at the commits modules/launch_utils.py names) in "
                          "$LORA_EXT_WEBUI_REPOS/<name>")
    return found


def webui_python(source: str) -> str:
    return host_python(source, "webui-venv", "LORA_EXT_WEBUI_PYTHON", "real-webui", "about 25 minutes")


def host_python(source: str, recipe: str, variable: str, tier: str, pip_time: str) -> str:
    """The python of a host's venv: $`variable`, else the one .ci/`recipe` built (it prints the cached venv's
    path; it builds only when asked to, as CI's setup does); Unavailable saying how to get one."""
    if os.environ.get(variable):
        return os.environ[variable]
    built = subprocess.run(["bash", os.path.join(ROOT, ".ci", recipe), source, "--check"],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise Unavailable(f"{tier} tier skipped: its venv is not built; run `bash .ci/setup` (first time "
                          f"{pip_time} of pip) or set {variable}")
    return os.path.join(built.stdout.strip(), "bin", "python")


def lbw_source(source: str) -> str | None:
    """hako-mikan's lora-block-weight, installed beside our extension as the oracle of the block-weight tests
    ($LORA_EXT_LBW, or lora-block-weight/ beside the webui source); None where it is not at hand."""
    path = os.environ.get("LORA_EXT_LBW") or os.path.join(os.path.dirname(source), "lora-block-weight")
    return os.path.abspath(path) if os.path.isfile(os.path.join(path, "scripts", "lora_block_weight.py")) else None


def _ignore_source(source: str):
    """What a copy of a webui install leaves behind: its venv, models, outputs, settings and extensions."""
    top = {"repositories", "venv", "models", "outputs", "log", "tmp", "config.json", "ui-config.json", ".git",
           "cache.json", "params.txt", "extensions"}

    def ignore(folder, names):
        skip = top if os.path.abspath(folder) == source else set()
        return [n for n in names if n in skip or n == "__pycache__"]
    return ignore


def make_work_copy(work: str, source: str, repos: dict, python: str) -> dict:
    """A writable webui under `work`: its source, repository links, the extension, the probe script, a tiny
    checkpoint with its .yaml and a local CLIP folder. Returns the paths tests use."""
    from lora_ext import tiny

    webui = os.path.join(work, "webui")
    shutil.copytree(source, webui, ignore=_ignore_source(source), copy_function=shutil.copy)
    os.makedirs(os.path.join(webui, "extensions"))
    _make_writable(webui)
    os.makedirs(os.path.join(webui, "repositories"), exist_ok=True)
    for name, folder in repos.items():
        os.symlink(folder, os.path.join(webui, "repositories", name))
    extension = os.path.join(webui, "extensions", "lora_ext")
    shutil.copytree(ROOT, extension, ignore=EXTENSION_IGNORE)
    shutil.copy(os.path.join(ROOT, "tests", "real_webui", "webui_probe.py"), os.path.join(webui, "scripts"))
    lbw = lbw_source(source)
    if lbw:
        shutil.copytree(lbw, os.path.join(webui, "extensions", LBW_FOLDER), copy_function=shutil.copy)
    paths = {"webui": webui, "extension": extension, "python": python, "lbw": bool(lbw),
             "checkpoints": os.path.join(webui, "models", "Stable-diffusion"),
             "loras": os.path.join(webui, "models", "Lora")}
    for key in ("checkpoints", "loras"):
        os.makedirs(paths[key], exist_ok=True)
    # lora-block-weight, the block-weight oracle, is enabled only in the servers its tests start (LBW_SETTINGS):
    # beside the others it changed what they saw
    with open(os.path.join(webui, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**SETTINGS, "disabled_extensions": [LBW_FOLDER]}, f)
    with open(os.path.join(webui, LBW_SETTINGS), "w", encoding="utf-8") as f:
        json.dump(SETTINGS, f)
    clip = os.path.join(work, "clip-tiny")
    model = tiny.build("sd1")
    tiny.save_checkpoint(model, os.path.join(paths["checkpoints"], CHECKPOINT), clip)
    tiny.save_checkpoint(tiny.build("sd1", seed=1), os.path.join(paths["checkpoints"], OTHER_CHECKPOINT), clip)
    for name, seed in LORAS.items():
        _random_lora(model, os.path.join(paths["loras"], name), seed)
    _random_lora(model, os.path.join(paths["loras"], PLAIN_LORA), 5, conv_rank=None)
    from lora_ext import files
    from random_networks import make_random_dora
    files.write_kohya(os.path.join(paths["loras"], DORA), files.kohya_tensors(make_random_dora(model)),
                      {"ss_output_name": "dora"})
    from random_networks import make_random_network
    for network, conv in TYPE_FILES.items():
        modules = {n: m for n, m in make_random_network(model, network, conv=conv).items()
                   if not n.endswith(BUILTIN_UNMAPPED)}
        files.write_kohya(os.path.join(paths["loras"], f"{network}.safetensors"), files.kohya_tensors(modules),
                          {"ss_output_name": network})
    # the tiny SDXL beside it (a server started with --ckpt loads it), the open_clip config its bigG is built
    # from where webui_probe.py registers it, and an SDXL LoCon
    xl = sdxl_files(work, paths["checkpoints"])
    shutil.copytree(xl["openclip"], os.path.join(webui, OPENCLIP_FOLDER))
    paths["sdxl_checkpoint"] = xl["checkpoint"]
    _random_lora(xl["model"], os.path.join(paths["loras"], SDXL_LORA), 3)
    # SDXL files of other types: DoRA (on the open_clip q/k/v row blocks too), LoHa, full/diff
    for network in SDXL_TYPES:
        modules = make_random_dora(xl["model"]) if network == "dora" else make_random_network(xl["model"], network)
        files.write_kohya(os.path.join(paths["loras"], f"xl_{network}.safetensors"), files.kohya_tensors(modules),
                          {"ss_output_name": f"xl_{network}", "ss_base_model_version": "sdxl_base_v1-0"})
    # the same tensors as alpha, as the kohya .pt state dict older tools wrote (read inside the webui,
    # whose torch.load is its own checker)
    import torch
    from safetensors.torch import load_file
    torch.save(load_file(os.path.join(paths["loras"], "alpha.safetensors")), os.path.join(paths["loras"], "alpha_pt.pt"))
    return paths


SDXL_CHECKPOINT = "tiny_xl.safetensors"
SDXL_LORA = "xl_alpha.safetensors"
SDXL_TYPES = ("dora", "loha", "full")
OPENCLIP_FOLDER = "lora_ext_test_openclip"      # in the webui folder; webui_probe.py registers what it holds


def sdxl_files(folder: str, checkpoints: str | None = None) -> dict:
    """A tiny SDXL checkpoint with the sgm yaml the real webui instantiates, its CLIP-L folder (config,
    tokenizer and weights: sgm loads them with from_pretrained) and the open_clip config folder its bigG is
    built from (open_clip.add_model_config reads it; the webui's start-up does through webui_probe.py)."""
    from lora_ext import tiny

    model = tiny.build("sdxl")
    clip = os.path.join(folder, "clip-tiny-xl")
    checkpoint = os.path.join(checkpoints or folder, SDXL_CHECKPOINT)
    tiny.save_checkpoint(model, checkpoint, clip)
    model.text_holders()[0].transformer.save_pretrained(clip, safe_serialization=False)
    openclip = os.path.join(folder, "openclip-configs")
    os.makedirs(openclip, exist_ok=True)
    with open(os.path.join(openclip, f"{tiny.OPENCLIP_ARCH}.json"), "w", encoding="utf-8") as f:
        json.dump(tiny.openclip_config(model.spec), f)
    return {"checkpoint": checkpoint, "clip": clip, "openclip": openclip, "model": model}


def _random_lora(model, path: str, seed: int, conv_rank: int | None = 2) -> None:
    # a LoCon of every layer the webui's built-in Lora also applies (attention, convs, text encoder); without
    # conv_rank a plain LoRA (attention and the text encoder)
    from lora_ext import files
    from random_networks import make_random_lora

    modules = make_random_lora(model, rank=4, alpha=4.0, conv_rank=conv_rank, seed=seed)
    files.write_kohya(path, files.kohya_tensors(modules), {"ss_output_name": os.path.splitext(os.path.basename(path))[0]})


def _make_writable(folder: str) -> None:
    # the shared source is read-only; the copy must not be
    for dirpath, dirnames, filenames in os.walk(folder):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o644)


def run_installer(paths: dict) -> subprocess.CompletedProcess:
    """The extension's install.py, run the way the webui's launcher runs it (its python, PYTHONPATH = the
    webui folder, from the webui folder)."""
    env = clean_env()
    env["PYTHONPATH"] = paths["webui"]
    return subprocess.run([paths["python"], os.path.join(paths["extension"], "install.py")], cwd=paths["webui"],
                          env=env, capture_output=True, text=True, timeout=300)


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False",
               CUDA_VISIBLE_DEVICES="")
    return env


class Server:
    """One webui process (and its children, in their own process group) on a loopback port."""

    def __init__(self, paths: dict, port: int, extra_flags=(), log_name="webui.log", base_flags=FLAGS):
        self.paths, self.port = paths, port
        self.url = f"http://127.0.0.1:{port}"
        self.flags = list(base_flags) + ["--port", str(port)] + list(extra_flags)
        self.log_path = os.path.join(os.path.dirname(paths["webui"]), log_name)
        self.proc = None

    def start(self, timeout_s: float = 300) -> "Server":
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()      # this run's part of the log: after what earlier runs wrote
        self.proc = subprocess.Popen([self.paths["python"], "launch.py", *self.flags], cwd=self.paths["webui"],
                                     env=clean_env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        # no request before "Startup time:": one sent between gradio's launch and the API's set-up kills the
        # webui ("Cannot add middleware after an application has started")
        deadline = time.monotonic() + timeout_s
        while "Startup time:" not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the webui exited ({self.proc.returncode}) before start-up:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"no 'Startup time:' after {timeout_s} s:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        return self

    def log(self) -> str:
        """What this run of the webui has printed."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode("utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)       # the group we started: the webui and its children
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log.close()

    # --- HTTP ---------------------------------------------------------------------------------------------

    def client(self, timeout_s: float = 600):
        import httpx
        return httpx.Client(base_url=self.url, timeout=timeout_s)

    def get(self, route: str, **kw):
        with self.client() as c:
            r = c.get(route, **kw)
        r.raise_for_status()
        return r.json()

    def post(self, route: str, payload: dict):
        with self.client() as c:
            r = c.post(route, json=payload)
        r.raise_for_status()
        return r.json()

    def txt2img(self, prompt: str, slots=None, lbw: bool = False, **params) -> dict:
        """`lbw`: lora-block-weight active (its presets as it ships them), so that `<lora:x:w:lbw=...>` acts."""
        payload = {"prompt": prompt, "negative_prompt": "", "steps": 3, "width": 64, "height": 64, "seed": 7,
                   "sampler_name": "Euler", "cfg_scale": 5.0, "batch_size": 1, **params}
        scripts = {}
        if slots is not None:
            scripts["additional networks"] = {"args": slots}
        if lbw:
            scripts["lora block weight"] = {"args": [None, True]}
        if scripts:
            payload["alwayson_scripts"] = scripts
        return self.post("/sdapi/v1/txt2img", payload)

    def latents(self):
        """The last generation's final CFG-denoised latents (the probe script's record), taken once."""
        import numpy as np
        import torch

        got = self.get("/probe/latents")
        if got["shape"] is None:
            raise AssertionError("no latents recorded: the generation did not sample")
        data = np.frombuffer(base64.b64decode(got["data"]), dtype=np.float32).reshape(got["shape"])
        return torch.from_numpy(data.copy())

    def weights(self) -> str:
        return self.get("/probe/weights")["sha256"]


class Tier:
    """Whether a real-host tier can run here: `find()` gives its setup (the source, its venv ...) or raises
    Unavailable; the tier's tests (those under its `folder`) are skipped with that one line otherwise."""

    def __init__(self, folder: str, find):
        self.folder, self._find, self._found = folder, find, None

    @property
    def why(self) -> str | None:
        if self._found is None:
            try:
                self._found = ("", self._find())
            except Unavailable as e:
                self._found = (str(e), None)
        return self._found[0] or None

    @property
    def setup(self):
        return self._found[1]

    def skip_if_unavailable(self, items) -> None:
        import pytest

        ours = [i for i in items if self.folder in str(i.fspath)]
        if ours and self.why:
            for item in ours:
                item.add_marker(pytest.mark.skip(reason=self.why))

    def summary(self, terminalreporter) -> None:
        if self._found is not None and self.why:
            terminalreporter.write_line(self.why)
