"""Compare after training: a run folder's saves x weights x prompts on the loaded model, same seed per cell,
pages + index written without overwriting, cancellable, the model given back bit-exact; and the CLI."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from lora_ext.tools import compare
from lora_ext import files
from lora_ext.cli import main
from random_networks import make_random_lora
from lora_ext.hosts.webui import WebuiHost
from lora_ext.train.sampling import sample_image


def _run_folder(folder, model, name="run"):
    """What a run with save_every_n_epochs=1 over 2 epochs leaves: NAME-000001, NAME-000002 ... and NAME."""
    os.makedirs(folder, exist_ok=True)
    for i, (stem, steps, loss) in enumerate(((f"{name}-000002", 20, 0.2), (f"{name}-000001", 10, 0.3), (name, 30, 0.1))):
        modules = make_random_lora(model, rank=4, alpha=4.0, conv_rank=None, seed=10 + i)
        for m in modules.values():
            m.parts["lora_up.weight"] = m.parts["lora_up.weight"] * 20
        files.write_kohya(str(folder / f"{stem}.safetensors"), files.kohya_tensors(modules),
                          {"ss_steps": str(steps), "lora_ext_avg_loss": str(loss)})
    return folder


def _cell(page, plan, col, row):
    w, h = plan.size
    return np.asarray(page)[34 + row * h: 34 + (row + 1) * h, 72 + col * w: 72 + (col + 1) * w]


def test_a_grid_of_saves_weights_and_prompts_same_seed_model_given_back(tmp_path):
    model = tiny_model("sd1")
    host = WebuiHost(model)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    saves = compare.run_saves(str(_run_folder(tmp_path / "out", model)))
    assert [s.label for s in saves] == ["epoch 1", "epoch 2", "final"] and [s.loss for s in saves] == [0.3, 0.2, 0.1]
    plan = compare.check(compare.Plan(saves, [0, "1"], ["a cat", " ", "a dog"], seed=3, steps=2, size=(64, 64)))
    assert plan.prompts == ["a cat", "a dog"] and plan.weights == [0.0, 1.0]
    seen = []
    result = compare.compare(plan, str(tmp_path / "grid"), compare.preview_renderer(host),
                             on_progress=lambda done, total, text: seen.append((done, total)))
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert seen[-1] == (12, 12) and result.cells == 12 and not result.cancelled
    assert [os.path.basename(p) for p in result.pages] == ["prompt_01.png", "prompt_02.png"]
    page = Image.open(result.pages[0])
    assert page.size == (72 + 3 * 64, 34 + 2 * 64)
    plain = np.asarray(sample_image(host, "a cat", 3, 2, size=(64, 64)))
    for col in range(3):            # weight 0 is the plain model, with the seed of every cell
        assert np.array_equal(_cell(page, plan, col, 0), plain)
    ones = [_cell(page, plan, col, 1) for col in range(3)]
    assert all(np.abs(c.astype(int) - plain).max() > 2 for c in ones)
    assert np.abs(ones[0].astype(int) - ones[2]).max() > 2          # the saves differ
    index = json.load(open(tmp_path / "grid" / "index.json"))
    assert len(index["cells"]) == 12 and index["saves"][0] == {"file": "run-000001.safetensors", "label": "epoch 1",
                                                              "steps": 10, "loss": 0.3}
    cell = index["cells"][1]
    assert cell["weight"] == 1.0 and "Seed: 3" in cell["infotext"] and "AddNet Weight A 1: 1" in cell["infotext"]
    assert "AddNet Model 1: run-000001(" in cell["infotext"]
    assert "prompt_02.png" in open(tmp_path / "grid" / "index.html").read()
    with pytest.raises(compare.CompareError, match="exists"):
        compare.compare(plan, str(tmp_path / "grid"), compare.preview_renderer(host))


def test_cancel_mid_grid_keeps_what_was_done_and_gives_the_model_back(tmp_path):
    model = tiny_model("sd1")
    host = WebuiHost(model)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    plan = compare.check(compare.Plan(compare.run_saves(str(_run_folder(tmp_path / "out", model))), [0.5, 1],
                                      ["a cat", "a dog"], steps=2, size=(64, 64)))
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 7
    result = compare.compare(plan, str(tmp_path / "grid"), compare.preview_renderer(host), stop)
    assert result.cancelled and len(result.pages) == 1 and result.cells == 6
    index = json.load(open(tmp_path / "grid" / "index.json"))
    assert index["cancelled"] and len(index["cells"]) == 7 and index["pages"] == ["prompt_01.png"]
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_what_is_wrong_with_a_request_is_said(tmp_path):
    model = tiny_model("sd1")
    _run_folder(tmp_path / "two", model, "a")
    _run_folder(tmp_path / "two", model, "b")
    with pytest.raises(compare.CompareError, match=r"several runs \(a, b\); say which"):
        compare.run_saves(str(tmp_path / "two"))
    assert len(compare.run_saves(str(tmp_path / "two"), "b")) == 3
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.safetensors").write_bytes(b"not a safetensors file")
    for folder, said in ((tmp_path / "empty", "no LoRA files"), (tmp_path / "nothing", "not a folder")):
        with pytest.raises(compare.CompareError, match=said):
            compare.run_saves(str(folder))
    saves = compare.run_saves(str(tmp_path / "two"), "a")
    for plan, said in ((compare.Plan(saves, ["nan"], ["p"]), "finite number"), (compare.Plan(saves, [1], []), "one prompt"),
                       (compare.Plan(saves, [1], ["p"], steps=0), "steps 0 must be 1-150"),
                       (compare.Plan(saves, [1], ["p"], size=(100, 64)), "multiple of 8"),
                       (compare.Plan(saves, [0.1] * 400, ["p"] * 2), "at most 2048")):
        with pytest.raises(compare.CompareError, match=said):
            compare.check(plan)


def test_comparisons_asked_for_within_one_second_get_folders_of_their_own(tmp_path, monkeypatch):
    """The default folder is named by the second: a second comparison in the same second (a double click, the
    tab's cancel-and-again) once found it taken and was refused; it now gets -2, -3 ..."""
    import time

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261207-064557")
    first = compare.new_folder(str(tmp_path), "run")
    assert first == str(tmp_path / "run-20261207-064557")
    os.makedirs(first)
    second = compare.new_folder(str(tmp_path), "run")
    os.makedirs(second)
    assert second == first + "-2" and compare.new_folder(str(tmp_path), "run") == first + "-3"


def test_the_cli_writes_the_grid_and_refuses_an_existing_folder(tmp_path, capsys):
    _run_folder(tmp_path / "out", tiny_model("sd1"))
    args = ["compare", str(tmp_path / "out"), "--model", "tiny-sd1", "--prompt", "a cat", "--weights", "0.5,1",
            "--steps", "2", "--size", "64", "--out", str(tmp_path / "grid")]
    assert main(args) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["images"] == 6 and os.path.isfile(answer["pages"][0])
    assert main(args) == 2 and "exists; give a new folder" in capsys.readouterr().err
    assert main(args[:2] + ["--model", "tiny-sd1", "--prompt", "x", "--weights", "a,b"]) == 2
    assert "write numbers separated by commas" in capsys.readouterr().err


def test_the_compare_tab_makes_the_grid_on_the_model_and_says_what_is_wrong(tmp_path):
    from lora_ext.ui import compare_tab
    from lora_ext.ui.jobs import Job
    from lora_ext.ui.tab import TabContext

    model = tiny_model("sd1")
    host = WebuiHost(model)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    folder = _run_folder(tmp_path / "Lora", model)
    released = []
    ctx = TabContext(lambda: str(folder), host_fn=lambda: host, release_fn=released.append)
    import threading
    cancel = threading.Event()
    assert compare.runs_in(str(folder)) == ["run"]
    said = compare_tab.make_grid(ctx, Job("comparison"), cancel, "run", "a cat\n\na dog", "0.5, 1", 2, 2, 64)
    assert said.startswith("12 images in") and released == [host]
    assert [os.path.basename(p) for p in compare_tab.latest_pages(ctx)] == ["prompt_01.png", "prompt_02.png"]
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    for args, problem in ((("run", "a cat", "0.5, x", 1, 2, 64), "write numbers separated by commas"),
                          (("", "a cat", "1", 1, 2, 64), "choose a run"),
                          (("run", "a cat", "1", 1, 2, 60), "multiple of 8")):
        assert problem in compare_tab.make_grid(ctx, Job("comparison"), cancel, *args)
    cancel.set()
    assert compare_tab.make_grid(ctx, Job("comparison"), cancel, "run", "a cat", "1", 1, 2, 64).startswith("Cancelled")
