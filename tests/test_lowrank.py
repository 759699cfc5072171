"""Resize, merge and extract LoRAs: against the truncated SVD of the full delta (torch.linalg.svd)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_model
from lora_ext import files
from lora_ext.tools import lowrank
from random_networks import make_random_lora
from lora_ext.merge import Item, merge_checkpoint
from lora_ext.tools.extract import extract
from lora_ext import tiny


def _best(delta, r):
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], float((s[:r] ** 2).sum() / (s ** 2).sum())


def _delta(m, shape=None):
    down = m.parts["lora_down.weight"]
    shape = shape or (m.parts["lora_up.weight"].shape[0],) + tuple(down.shape[1:])
    return m.delta(shape).double().reshape(shape[0], -1)


def test_reduce_is_exact_at_full_rank_and_optimal_below():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(64, 8, generator=g), torch.randn(8, 96, generator=g)
    full = up.double() @ down.double()
    f = lowrank.reduce_factors(up, down, rank=8)
    torch.testing.assert_close(f.up @ f.down, full, rtol=1e-9, atol=1e-9)
    assert f.energy == pytest.approx(1.0)
    f = lowrank.reduce_factors(up, down, rank=3)
    best, energy = _best(full, 3)
    torch.testing.assert_close(f.up @ f.down, best, rtol=1e-8, atol=1e-8)
    assert f.energy == pytest.approx(energy)
    f = lowrank.reduce_factors(up, down, energy=0.9)
    _, below = _best(full, f.up.shape[1] - 1)
    assert f.energy >= 0.9 > below


def test_resize_a_locon_file(tmp_path):
    modules = make_random_lora(tiny_model("sd1"), rank=4, alpha=2.0, conv_rank=2)
    small, kept = lowrank.resize(modules, rank=2)
    for name, m in modules.items():
        best, energy = _best(_delta(m), 2)
        torch.testing.assert_close(_delta(small[name]), best, rtol=1e-4, atol=1e-6)
        assert kept[name] == pytest.approx(energy, rel=1e-6) and small[name].rank == 2
        assert small[name].parts["lora_down.weight"].ndim == m.parts["lora_down.weight"].ndim
    path = str(tmp_path / "r.safetensors")
    files.write_kohya(path, files.kohya_tensors(small), {})
    assert files.read(path).ranks() == 2


def test_merge_loras_concatenated_is_the_sum_and_svd_is_the_best_approximation():
    model = tiny_model("sd1")
    a, b = make_random_lora(model, rank=4, seed=1), make_random_lora(model, rank=2, seed=2)
    merged, _ = lowrank.merge_loras([(a, 0.7), (b, -1.5)])
    reduced, kept = lowrank.merge_loras([(a, 0.7), (b, -1.5)], rank=3)
    for name in a:
        want = 0.7 * _delta(a[name]) - 1.5 * _delta(b[name])
        assert merged[name].rank == a[name].rank + b[name].rank
        torch.testing.assert_close(_delta(merged[name]), want, rtol=1e-5, atol=1e-7)
        best, energy = _best(want, 3)
        torch.testing.assert_close(_delta(reduced[name]), best, rtol=1e-4, atol=1e-6)
        assert kept[name] == pytest.approx(energy, rel=1e-5)


def test_extract_recovers_a_merged_lora(tmp_path):
    model = tiny_model("sd1")
    base = str(tmp_path / "base.safetensors")
    tiny.save_checkpoint(model, base)
    modules = dict(list(make_random_lora(model, rank=4, conv_rank=2, seed=5).items())[::7])
    lora = str(tmp_path / "l.safetensors")
    files.write_kohya(lora, files.kohya_tensors(modules), {})
    tuned = str(tmp_path / "tuned.safetensors")
    merge_checkpoint(base, [Item(lora)], tuned, precision="fp32")
    got, kept, arch = extract(base, tuned, rank=8, conv_rank=4)
    assert set(got) == set(modules) and arch.name == "sd1"
    for name, m in modules.items():
        want = _delta(m)
        err = float((_delta(got[name], (want.shape[0],) + tuple(got[name].parts["lora_down.weight"].shape[1:])) - want).norm() / want.norm())
        assert err < 1e-4 and kept[name] > 0.9999, name


def test_cli_resize_merge_extract(tmp_path):
    model = tiny_model("sd1")
    a = str(tmp_path / "a.safetensors")
    files.write_kohya(a, files.kohya_tensors(make_random_lora(model, rank=4, seed=1)), {"ss_output_name": "a"})
    run = lambda *args: subprocess.run([sys.executable, "-m", "lora_ext", *args], cwd=ROOT,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    r = run("resize", a, "--rank", "2", "--out", str(tmp_path / "a2.safetensors"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kept_energy"]["modules"] > 0
    meta = files.read(str(tmp_path / "a2.safetensors")).metadata
    assert meta["ss_network_dim"] == "2" and meta["ss_output_name"] == "a"
    r = run("merge-loras", "--lora", f"{a}:0.5", "--lora", str(tmp_path / "a2.safetensors"), "--out",
            str(tmp_path / "m.safetensors"), "--rank", "3")
    assert r.returncode == 0, r.stderr
    assert files.read(str(tmp_path / "m.safetensors")).ranks() == 3
    r = run("resize", a, "--out", str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and "--rank R or --energy F" in r.stderr
    base = str(tmp_path / "base.safetensors")
    tiny.save_checkpoint(model, base)
    r = run("extract", "--base", base, "--tuned", base, "--out", str(tmp_path / "e.safetensors"))
    assert r.returncode == 2 and "do not differ" in r.stderr and "Traceback" not in r.stderr


def test_cli_bench_runs_the_benchmarks_of_the_checkout():
    r = subprocess.run([sys.executable, "-m", "lora_ext", "bench", "apply", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--rank" in r.stdout and "--rounds" in r.stdout     # bench/apply.py's own options
    r = subprocess.run([sys.executable, "-m", "lora_ext", "bench", "nope"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr and "memory" in r.stderr
