"""bench/cuda.py, the issue's CUDA check, kept working where no GPU is: the same code on the tiny model on the
CPU (each lever's run, the model given back bit-exact), and its refusals."""
import json
import subprocess
import sys

import torch

from conftest import ROOT


def _bench(*args):
    return subprocess.run([sys.executable, "bench/cuda.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_the_cuda_bench_runs_every_lever_on_the_cpu_and_each_gives_the_model_back():
    out = _bench("--device", "cpu", "--arch", "sd1", "--size", "64", "--steps", "2", "--images", "2",
                 "--levers", "fp32,fp16,no_sdpa,cudnn_benchmark,all_recomputed")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    runs = report["runs"]
    assert list(runs) == ["fp16", "all_recomputed", "no_sdpa", "cudnn_benchmark", "fp32"]   # fp32 last: it casts
    for name, run in runs.items():
        assert run["weights_back_bit_exact"] is True, name
        assert len(run["losses"]) == 2 and all(loss == loss for loss in run["losses"]), name
        assert run["first_step_s"] > 0 and run["median_step_s"] > 0 and run["estimate_gb"] > 0
        assert run["peak_allocated_gb"] is None         # a CUDA figure: none on the CPU
    # levers that change no arithmetic on the CPU give the same first loss
    assert len({runs[n]["losses"][0] for n in ("fp16", "all_recomputed", "cudnn_benchmark", "fp32")}) == 1
    assert set(report["ratios_against_fp16"]) == {"all_recomputed", "no_sdpa", "cudnn_benchmark", "fp32"}


def test_the_cuda_bench_names_what_is_wrong():
    unknown = _bench("--device", "cpu", "--levers", "fp16,warp_speed")
    assert unknown.returncode != 0 and "--levers: unknown warp_speed" in unknown.stderr
    if not torch.cuda.is_available():
        no_gpu = _bench()
        assert no_gpu.returncode != 0 and "no CUDA device here" in no_gpu.stderr
        assert "Traceback" not in no_gpu.stderr
