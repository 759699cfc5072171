"""The resumable state of a training run: a folder `<name>-state/` holding `state.json` (counters, losses,
the optimizer's settings) and `tensors-<step>.safetensors` (the network, the optimizer's tensors, the RNG).

No pickle: inside the webui `torch.load` is the webui's own checker, which refuses what this torch writes
and hands back None; and a state is a file a user may be handed. The new step's tensors are written first
(temp name, renamed), then state.json naming them (the same way), then the old tensors go: a kill at any
moment leaves the previous state or the new one whole, never half of each."""
from __future__ import annotations

import json
import os

import torch

FORMAT = "lora_ext-training-state/1"
JSON = "state.json"


class StateError(ValueError):
    pass


def state_folder(output_dir: str, output_name: str) -> str:
    return os.path.join(output_dir, f"{output_name}-state")


def save(folder: str, network, optimizer, counters: dict, kept: dict | None = None) -> str:
    """Writes the state; `counters` are JSON values (step, epoch, batch, losses, ...), `kept` the run's
    features' {name: (JSON values, {name: tensor})}. Returns the folder."""
    from safetensors.torch import save as to_bytes

    from ..atomic import atomic_write

    tensors = {f"network.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    opt = optimizer.state_dict()
    per_param = {}
    for index, entry in opt["state"].items():
        plain = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[name] = value
        per_param[str(index)] = plain
    tensors["torch_rng"] = torch.get_rng_state()
    for feature, (_, held) in (kept or {}).items():
        tensors.update({f"feature.{feature}.{k}": v.detach().cpu().contiguous() for k, v in held.items()})
    name = f"tensors-{int(counters['step']):08d}.safetensors"
    doc = {"format": FORMAT, **counters, "tensors": name,
           "features": {feature: values for feature, (values, _) in (kept or {}).items()},
           "optimizer": {"param_groups": opt["param_groups"], "state": per_param}}
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, name), to_bytes(tensors, {"format": FORMAT}), overwrite=True)
    atomic_write(os.path.join(folder, JSON), json.dumps(doc).encode("utf-8"), overwrite=True)
    for old in os.listdir(folder):
        if old.startswith("tensors-") and old.endswith(".safetensors") and old != name:
            os.unlink(os.path.join(folder, old))
    return folder


def load(path: str, network, optimizer) -> dict:
    """Restores network, optimizer and RNG from a state folder (or its state.json); returns the counters."""
    from safetensors.torch import load_file

    folder = os.path.dirname(path) if os.path.basename(path) == JSON else path
    doc, tensors = _read(folder, path, load_file)
    counters = _counters(doc, folder)
    _check_tensors(tensors, folder)
    prefix = "network."
    try:
        network.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    except RuntimeError as e:
        raise StateError(f"resume: {folder} holds another network (rank, type or model) than this run's "
                         f"({str(e).splitlines()[0]})") from None
    opt = doc.get("optimizer")
    try:
        state = {}
        for index, plain in opt["state"].items():
            entry = dict(plain)
            head = f"optimizer.{index}."
            entry.update({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)})
            state[int(index)] = entry
        optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as e:
        raise StateError(f"resume: {folder} was saved with another optimizer or network size, or its optimizer "
                         f"entry is damaged ({type(e).__name__}: {str(e)[:80]})") from None
    torch.set_rng_state(tensors["torch_rng"])
    counters["features"] = {feature: (values, {k.removeprefix(f"feature.{feature}."): v for k, v in tensors.items()
                                               if k.startswith(f"feature.{feature}.")})
                            for feature, values in doc.get("features", {}).items()}
    return counters


def _counters(doc: dict, folder: str) -> dict:
    """step, epoch, batch and losses as a run saves them: whole numbers from 0, one finite loss per step
    (so a step count no run reached is caught), an epoch count no larger than the steps."""
    import math

    problems = []
    for name in ("step", "epoch", "batch"):
        v = doc.get(name)
        if type(v) is not int or v < 0:
            problems.append(f"{name} {v!r} is not a whole number from 0")
    losses = doc.get("losses")
    if not isinstance(losses, list) or not all(type(x) in (int, float) and math.isfinite(x) for x in losses):
        problems.append("losses is not a list of finite numbers")
    elif not problems and len(losses) != doc["step"]:
        problems.append(f"step {doc['step']} with {len(losses)} losses (a run saves one a step)")
    if not problems and doc["epoch"] > doc["step"]:
        problems.append(f"epoch {doc['epoch']} after {doc['step']} steps")
    kept = doc.get("features", {})
    if not isinstance(kept, dict) or not all(isinstance(v, dict) for v in kept.values()):
        problems.append("features is not a table of the run's features' values")
    if problems:
        raise StateError(f"resume: {folder}/{JSON} is damaged or was edited: {'; '.join(problems)}")
    return {k: doc[k] for k in ("step", "epoch", "batch", "losses")}


def _check_tensors(tensors: dict, folder: str) -> None:
    rng = tensors.get("torch_rng")
    want = torch.get_rng_state()
    if rng is None or rng.dtype != want.dtype or rng.shape != want.shape:
        raise StateError(f"resume: {folder}'s random-number state is missing or not torch's; it is not a state "
                         "this program saved")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise StateError(f"resume: {folder} holds NaN or infinite values ({bad[0]}"
                         f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): resume from an earlier state")


def _read(folder, path, load_file):
    if not os.path.isdir(folder):
        hint = " (states are folders now: <name>-state/)" if path.endswith(".pt") else ""
        raise StateError(f"resume: {path} is not a lora_ext training state folder{hint}")
    try:
        with open(os.path.join(folder, JSON), encoding="utf-8") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StateError(f"resume: {folder} is not a lora_ext training state ({JSON} says another format)")
        name = os.path.basename(str(doc.get("tensors", "")))     # a name inside the folder, nothing else
        if not os.path.isfile(os.path.join(folder, name)):
            raise StateError(f"resume: {folder} lacks {name or 'its tensors file'}; it is not a whole training state")
        tensors = load_file(os.path.join(folder, name))
    except StateError:
        raise
    except FileNotFoundError:
        raise StateError(f"resume: {folder} lacks {JSON}; it is not a whole training state") from None
    except Exception as e:
        raise StateError(f"resume: {folder} is not a readable training state ({type(e).__name__})") from None
    return doc, tensors
