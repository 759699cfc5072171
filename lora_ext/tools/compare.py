"""Compare after training: a run's saved LoRAs (columns: its numbered saves and the final file, each with the
average loss it was saved at) x LoRA weights (rows) x test prompts (one page each), the same seed in every
cell, on the loaded model, which is given back bit-exact. Writes one PNG per prompt and an index (JSON and
HTML) with each cell's parameters, in the webui's infotext form; nothing is written over."""
from __future__ import annotations

import html
import json
import os
import re
import time
from dataclasses import dataclass, field

from ..weights import weight_value

_NUMBERED = re.compile(r"^(?P<name>.+)-(?P<tag>step)?(?P<n>\d{6})$")
MAX_CELLS = 2048


class CompareError(ValueError):
    """What is wrong with the request or the run folder, said so the user can fix it."""


@dataclass(frozen=True)
class Save:
    path: str
    label: str          # 'epoch 3', 'step 400', 'final'
    steps: int          # training steps it holds (ss_steps), for the order of the columns
    loss: float | None  # lora_ext_avg_loss: the average of the last 50 step losses when it was saved


@dataclass
class Plan:
    saves: list
    weights: list
    prompts: list
    seed: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    size: tuple = (512, 512)
    negative: str = ""


@dataclass
class Result:
    folder: str
    pages: list = field(default_factory=list)       # PNG paths, one per prompt done
    cells: int = 0
    cancelled: bool = False


def parse_weights(text) -> list:
    """The LoRA weights of the columns, from "0.4, 0.7, 1" (commas or semicolons)."""
    try:
        return [float(w) for w in str(text).replace(";", ",").split(",") if w.strip()]
    except ValueError:
        raise CompareError(f"weights {text!r}: write numbers separated by commas (0.4, 0.7, 1)") from None


def _lora_files(entries):
    """(file name, run name, numbered-suffix match or None) of the LoRA files among `entries`."""
    for entry in entries:
        stem, ext = os.path.splitext(entry)
        if ext == ".safetensors" and not entry.startswith("."):
            m = _NUMBERED.match(stem)
            yield entry, m["name"] if m else stem, m


def run_saves(folder: str, name: str | None = None) -> list:
    """The LoRAs one run wrote into `folder` (NAME.safetensors and NAME-000003 / NAME-step000400 beside it),
    ordered by their training steps. A folder holding several runs needs `name`."""
    from ..safetensors_io import FileProblem, read_header

    if not os.path.isdir(folder):
        raise CompareError(f"{folder}: not a folder; give the run's output_dir")
    runs: dict = {}
    for entry, base, m in _lora_files(sorted(os.listdir(folder))):
        path = os.path.join(folder, entry)
        if not os.path.isfile(path):        # a FIFO (or a device) named *.safetensors would block the read
            continue
        try:
            with open(path, "rb") as f:
                _, meta, _ = read_header(f, os.path.getsize(path))
        except (OSError, FileProblem):
            continue            # not a LoRA we can read: not part of a run's columns
        label = "final" if not m else (f"step {int(m['n'])}" if m["tag"] else f"epoch {int(m['n'])}")
        runs.setdefault(base, []).append(Save(path, label, _int(meta.get("ss_steps")), _float(meta.get("lora_ext_avg_loss"))))
    if name is not None:
        runs = {k: v for k, v in runs.items() if k == name}
    if not runs:
        raise CompareError(f"{folder}: no LoRA files" + (f" of a run named {name!r}" if name else ""))
    if len(runs) > 1:
        raise CompareError(f"{folder} holds several runs ({', '.join(sorted(runs))}); say which (--name)")
    saves = next(iter(runs.values()))
    return sorted(saves, key=lambda s: (s.label == "final", s.steps, s.label))


def runs_in(folder: str, limit: int = 50) -> list:
    """The run names (output names) of the LoRA files in `folder`, newest first."""
    newest: dict = {}
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    for entry, name, _ in _lora_files(entries):
        if not os.path.isfile(os.path.join(folder, entry)):
            continue
        newest[name] = max(newest.get(name, 0), os.path.getmtime(os.path.join(folder, entry)))
    return sorted(newest, key=lambda n: -newest[n])[:limit]


def _int(text) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 0


def _float(text):
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def check(plan: Plan) -> Plan:
    """The plan with its numbers checked; CompareError says what to change."""
    try:
        plan.weights = [weight_value(w, "weight") for w in plan.weights]
    except ValueError as e:
        raise CompareError(str(e)) from None
    plan.prompts = [p.strip() for p in plan.prompts if p and p.strip()]
    if not plan.prompts or not plan.weights or not plan.saves:
        raise CompareError("a comparison needs at least one prompt, one weight and one saved LoRA")
    if not 1 <= int(plan.steps) <= 150 or not 1 <= float(plan.cfg_scale) <= 30:
        raise CompareError(f"steps {plan.steps} must be 1-150 and cfg scale {plan.cfg_scale} 1-30")
    w, h = plan.size
    if not all(64 <= v <= 2048 and v % 8 == 0 for v in (w, h)):
        raise CompareError(f"size {w}x{h}: each side 64-2048 and a multiple of 8")
    cells = len(plan.saves) * len(plan.weights) * len(plan.prompts)
    if cells > MAX_CELLS:
        raise CompareError(f"{cells} images asked for; at most {MAX_CELLS} (fewer weights, prompts or saves)")
    return plan


def infotext(plan: Plan, save: Save, weight: float, prompt: str, short_hash: str | None) -> str:
    """A cell's parameters as the webui writes them (its PNG info), with the LoRA as an Additional Networks slot."""
    name = os.path.splitext(os.path.basename(save.path))[0]
    model = f"{name}({short_hash})" if short_hash else name
    w, h = plan.size
    return (f"{prompt}\nNegative prompt: {plan.negative}\nSteps: {plan.steps}, Sampler: DDIM (lora_ext preview), "
            f"CFG scale: {plan.cfg_scale:g}, Seed: {plan.seed}, Size: {w}x{h}, AddNet Enabled: True, "
            f"AddNet Module 1: LoRA, AddNet Model 1: {model}, AddNet Weight A 1: {weight:g}, AddNet Weight B 1: {weight:g}")


def preview_renderer(host, engine=None):
    """render(plan, save, weight, prompt) -> PIL image: the LoRA applied to the host's model by our engine, the
    image from the training previews' sampler. Call .close() after: the model is given back."""
    from ..apply import Engine, Request
    from ..train.sampling import sample_image

    from .. import files

    engine = engine or Engine()
    checked = set()

    def render(plan, save, weight, prompt):
        if save.path not in checked:        # a file the engine would refuse (NaN, another model) is no column
            try:
                files.read(save.path, host.arch)
            except files.LoraFileError as e:
                raise CompareError(f"{e}; the comparison stops (no grid labels a LoRA it did not apply)") from None
            checked.add(save.path)
        report = engine.apply(host, [Request(save.path, weight, weight, name=save.label)], "merge")
        if weight and not report.applied:
            why = "; ".join(report.warnings) or "no module fits the loaded model"
            raise CompareError(f"{save.path} was not applied ({why}); the comparison stops")
        return sample_image(host, prompt, plan.seed, plan.steps, plan.cfg_scale, plan.size, plan.negative)
    render.close = lambda: engine.restore(host)
    return render


def new_folder(parent: str, stem: str) -> str:
    """`parent/stem-<date>-<time>` for a comparison asked for without a folder; a second one within the same
    second gets -2, -3 ... (the name is only a default: compare() still refuses a folder that exists)."""
    base = os.path.join(parent, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    out, n = base, 1
    while os.path.exists(out):
        n += 1
        out = f"{base}-{n}"
    return out


def compare(plan: Plan, out_folder: str, render, should_stop=lambda: False, on_progress=None) -> Result:
    """Renders every cell of `plan` with `render(plan, save, weight, prompt) -> PIL image` (its info
    'parameters', where it has them, is the cell's infotext) and writes the pages and the index into
    `out_folder` (a new folder). Stops between cells when `should_stop()`; what is done so far is written;
    `render.close()`, where it has one, is called at the end (it gives the model back)."""
    from ..safetensors_io import file_hashes

    if os.path.exists(out_folder):
        raise CompareError(f"{out_folder} exists; give a new folder for the comparison")
    os.makedirs(out_folder)
    result, index = Result(out_folder), []
    hashes = {s.path: (file_hashes(s.path)["addnet_hash"] or "")[:12] or None for s in plan.saves}
    total, done = len(plan.saves) * len(plan.weights) * len(plan.prompts), 0
    try:
        for page, prompt in enumerate(plan.prompts, 1):
            cells = {}
            for save in plan.saves:
                for weight in plan.weights:
                    if should_stop():
                        result.cancelled = True
                        return result
                    image = render(plan, save, weight, prompt)
                    # a host that generates its own way (the webui) hands its infotext over as image.info
                    said = getattr(image, "info", {}).get("parameters") or infotext(plan, save, weight, prompt, hashes[save.path])
                    cells[save.path, weight] = image.convert("RGB")
                    done += 1
                    index.append({"page": page, "prompt": prompt, "save": os.path.basename(save.path), "label": save.label,
                                  "loss": save.loss, "weight": weight, "seed": plan.seed, "infotext": said})
                    if on_progress:
                        on_progress(done, total, f"{prompt[:40]} · {save.label} · weight {weight:g}")
            result.pages.append(_write_page(out_folder, page, plan, cells))
            result.cells += len(cells)
    finally:
        _write_index(out_folder, plan, index, result)
        close = getattr(render, "close", None)
        if close:
            close()
    return result


def _write_page(folder: str, page: int, plan: Plan, cells: dict) -> str:
    """One prompt's grid: a header row (save, loss), a label column (weight)."""
    from PIL import Image, ImageDraw

    from ..atomic import atomic_write

    w, h = plan.size
    top, left = 34, 72
    grid = Image.new("RGB", (left + w * len(plan.saves), top + h * len(plan.weights)), "white")
    draw = ImageDraw.Draw(grid)
    for c, save in enumerate(plan.saves):
        x = left + c * w
        draw.text((x + 4, 4), save.label, fill="black")
        draw.text((x + 4, 18), f"loss {save.loss:.4f}" if save.loss is not None else "loss not recorded", fill="black")
        for r, weight in enumerate(plan.weights):
            grid.paste(cells[save.path, weight], (x, top + r * h))
    for r, weight in enumerate(plan.weights):
        draw.text((4, top + r * h + h // 2), f"weight {weight:g}", fill="black")
    path = os.path.join(folder, f"prompt_{page:02d}.png")

    def write(f):
        grid.save(f, format="PNG")
    atomic_write(path, write)
    return path


def _write_index(folder: str, plan: Plan, cells: list, result: Result) -> None:
    from ..atomic import atomic_write

    data = {"prompts": plan.prompts, "weights": plan.weights, "seed": plan.seed, "steps": plan.steps,
            "size": list(plan.size), "cancelled": result.cancelled,
            "saves": [{"file": os.path.basename(s.path), "label": s.label, "steps": s.steps, "loss": s.loss}
                      for s in plan.saves],
            "pages": [os.path.basename(p) for p in result.pages], "cells": cells}
    atomic_write(os.path.join(folder, "index.json"), json.dumps(data, indent=2).encode())
    rows = "".join(f"<h2>{html.escape(p)}</h2><img src=\"{html.escape(os.path.basename(img))}\" "
                   f"title=\"{html.escape(p)}\">" for p, img in zip(plan.prompts, result.pages))
    details = "".join(f"<li><code>{html.escape(c['infotext'])}</code></li>" for c in cells)
    page = (f"<!doctype html><meta charset=utf-8><title>LoRA comparison</title>{rows}"
            f"{'<p>cancelled: the pages above are what was done</p>' if result.cancelled else ''}"
            f"<details><summary>each image's parameters</summary><ul>{details}</ul></details>")
    atomic_write(os.path.join(folder, "index.html"), page.encode())
