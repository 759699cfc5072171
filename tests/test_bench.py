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
    assert report["complete"] is True


def test_a_lever_that_fails_costs_no_other_s_figures_and_each_is_written_as_it_comes(tmp_path):
    """A lever's error is its entry; the JSON in $OUT is rewritten after each lever (a device call cut off at
    its limit keeps what it measured). The first lever's optimizer fails as out of memory would."""
    import os
    import textwrap

    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import runpy, sys
        import lora_ext.train.optim as optim
        real, calls = optim.make_optimizer, []

        def first_fails(*args):
            calls.append(args)
            if len(calls) == 1:
                raise MemoryError("planted")
            return real(*args)

        optim.make_optimizer = first_fails
        sys.argv = ["bench/cuda.py"] + sys.argv[1:]
        runpy.run_path("bench/cuda.py", run_name="__main__")
    """))
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, str(driver), "--device", "cpu", "--arch", "sd1", "--size", "64",
                          "--steps", "2", "--images", "2", "--levers", "fp16,fp32"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "cuda.json").read_text())
    assert report["complete"] is True and report == json.loads(out.stdout)
    assert report["runs"]["fp16"] == {"error": "MemoryError: planted"}
    assert report["runs"]["fp32"]["weights_back_bit_exact"] is True and "ratios_against_fp16" not in report


def test_the_cuda_bench_names_what_is_wrong():
    unknown = _bench("--device", "cpu", "--levers", "fp16,warp_speed")
    assert unknown.returncode != 0 and "--levers: unknown warp_speed" in unknown.stderr
    if not torch.cuda.is_available():
        no_gpu = _bench()
        assert no_gpu.returncode != 0 and "no CUDA device here" in no_gpu.stderr
        assert "Traceback" not in no_gpu.stderr


def test_the_side_by_side_bench_reads_both_progress_bars_and_refuses_a_non_checkout(tmp_path, monkeypatch):
    """bench/train.py --kohya: each tool's steps come from its own tqdm bar (kohya's `steps:` with avr_loss,
    ours `training:` with loss), each step when its bar is drawn (tqdm starts a redraw with \\r: a bar drawn
    whole is read at once, not at the next write), its peak RSS from the kernel. The process and the clock
    are scripted (each chunk the tool writes comes at the next tick), so no figure depends on the machine's
    load; a folder without train_network.py is refused."""
    import importlib.util
    import os
    import types

    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(ROOT, "bench", "train.py"))
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)

    for tool, bar, key in (("kohya", "steps", "avr_loss"), ("ours", "training", "loss")):
        chunks = [b"loading\n"] + [
            f"\r{bar}: {k * 25}%| | {k}/3 [00:01<00:02, 1.0s/it, {key}={1.5 - k / 10:.2f}]".encode() for k in range(4)
        ] + [b"\nother 9/9 [ line\n", b""]
        clock = {"t": 0.0}

        class Pipe:
            def read1(self, n):
                clock["t"] += 1.0           # each chunk arrives one tick after the one before
                return chunks.pop(0)

        with monkeypatch.context() as m:      # the modules themselves: patched for this call only
            m.setattr(bench_train.subprocess, "Popen", lambda *a, **k: types.SimpleNamespace(stdout=Pipe(), pid=1))
            m.setattr(bench_train.os, "wait4", lambda pid, opt: (pid, 0, types.SimpleNamespace(ru_maxrss=2 ** 20)))
            m.setattr(bench_train.time, "perf_counter", lambda: clock["t"])
            r = bench_train.timed_run(["tool"], str(tmp_path), {}, tool)
        # bar k arrives in chunk k + 2 (at tick k + 2); its step is stamped then, not when the next chunk comes
        assert r["first_step_s"] == 3.0 and r["step_s"] == [1.0, 1.0] and r["median_step_s"] == 1.0
        assert r["wall_s"] == 7.0 and r["average_loss"] == 1.2 and r["peak_rss_gb"] == 1.0
    out = subprocess.run([sys.executable, "bench/train.py", "--kohya", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode and "give a checkout of kohya-ss/sd-scripts" in out.stderr
