"""Faults: a training run killed with -9 resumes to the same LoRA as a run never stopped; Ctrl-C (SIGINT)
and SIGTERM stop after the step with the LoRA and a state saved; a merge killed mid-write leaves nothing
under the final name and its temp file goes at the next write; a read-only folder and a full disk are one
message each, with nothing left behind."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, tiny_model
from lora_ext import cli, files
from random_networks import make_random_lora
from lora_ext.atomic import TEMP_PREFIX
from lora_ext import sample_data, tiny

STEPS = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sample_data.make_sample_dataset(str(tmp_path_factory.mktemp("faultdata")), size=64, per_concept=2)


def _train_argv(data, out, *extra):
    return [sys.executable, "-m", "lora_ext", "train", "--pretrained_model_name_or_path", "tiny-sd1",
            "--train_data_dir", data["train"], "--output_dir", str(out), "--output_name", "f", "--resolution", "64",
            "--max_train_steps", str(STEPS), "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3",
            "--caption_extension", ".txt", "--save_every_n_steps", "2", "--save_state", "--seed", "5",
            "--network_dropout", "0.1", *extra]


# one thread: with two, the round-off of the tiny model's single-token mid-block attention varies from run
# to run on a busy machine (AdamW turns it into full-size updates), and three uninterrupted runs already
# differ by 6e-6; with one, they are bit-identical, and so must a resumed run be
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(argv):
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for_state(out, at_least: int, proc, timeout=240):
    state = os.path.join(str(out), "f-state", "state.json")
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(state) as f:
                step = json.load(f)["step"]
            if step >= at_least:
                return step
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("no state was saved in time")


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The same run, never stopped."""
    out = tmp_path_factory.mktemp("straight")
    done = subprocess.run(_train_argv(data, out), cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr
    return load_file(os.path.join(str(out), "f.safetensors"))


def _assert_same_lora(path, want):
    got = load_file(path)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), (k, (got[k].float() - want[k].float()).abs().max().item())


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(data, tmp_path, straight):
    proc = _start(_train_argv(data, tmp_path))
    stopped = _wait_for_state(tmp_path, 4, proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    with open(tmp_path / "f-state" / "state.json") as f:
        at = json.load(f)["step"]
    assert stopped <= at < STEPS
    resumed = subprocess.run(_train_argv(data, tmp_path, "--resume", str(tmp_path / "f-state")), cwd=ROOT,
                             capture_output=True, text=True, timeout=600, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == STEPS and f"resumed at step {at}" in resumed.stderr
    _assert_same_lora(str(tmp_path / "f.safetensors"), straight)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_after_the_step_with_lora_and_state_saved(data, tmp_path, straight, sig, code):
    proc = _start(_train_argv(data, tmp_path))
    _wait_for_state(tmp_path, 2, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    report = json.loads(stdout)
    assert report["cancelled"] and 2 <= report["steps"] < STEPS
    assert f"--resume {report['state']}" in stderr
    with open(os.path.join(report["state"], "state.json")) as f:
        assert json.load(f)["step"] == report["steps"]
    assert os.path.isfile(report["lora"])
    resumed = subprocess.run(_train_argv(data, tmp_path, "--resume", report["state"]), cwd=ROOT,
                             capture_output=True, text=True, timeout=600, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_lora(report["lora"], straight)


@pytest.fixture(scope="module")
def big_base(tmp_path_factory):
    """A tiny checkpoint carrying 400 MB of extra tensors, so that a merge takes long enough to be killed."""
    folder = tmp_path_factory.mktemp("bigmerge")
    model = tiny_model("sd1")
    base = str(folder / "base.safetensors")
    tiny.save_checkpoint(model, base)
    sd = load_file(base)
    sd.update({f"model_ema.extra_{i}": torch.zeros(25_000_000) for i in range(4)})
    save_file(sd, base)
    lora = str(folder / "l.safetensors")
    files.write_kohya(lora, files.kohya_tensors(make_random_lora(model, seed=2)), {})
    return folder, base, lora


# the merge CLI in a child whose file writes stop for good after 1 MB, having said so in a marker file: the
# test kills it there, mid-write, however fast the disk (a merge left to run could finish before a kill)
_STALLING_MERGE = """
import os, sys, time
import lora_ext.atomic as sio
from lora_ext import cli
real, marker = os.fdopen, sys.argv[1]

class Stalling:
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        written = self.f.write(b)
        self.n += len(b)
        if self.n > 1_000_000:
            self.f.flush()
            open(marker, "w").close()
            time.sleep(3600)
        return written
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

sio.os.fdopen = lambda fd, mode: Stalling(real(fd, mode))
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_killed_merge_leaves_no_final_file_and_its_temp_goes_next_time(big_base, tmp_path):
    folder, base, lora = big_base
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--model", base, "--lora", lora, "--out", str(out), "--precision", "fp32"]
    marker = str(folder / f"stalled-{tmp_path.name}")
    proc = _start([sys.executable, "-c", _STALLING_MERGE, marker] + args)
    deadline = time.time() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert os.path.exists(marker), proc.communicate()
    temps = [n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)]
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and len(temps) == 1 and os.path.getsize(tmp_path / temps[0]) > 1_000_000
    done = subprocess.run([sys.executable, "-m", "lora_ext"] + args[:-2] + ["--precision", "fp16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["merged.safetensors", "merged.yaml"]     # the dead run's temp is gone


def _fail_writes_with(monkeypatch, code):
    """Every file write of ours fails as a full disk or a read-only folder does, after some bytes."""
    import lora_ext.atomic as sio

    real = os.fdopen

    class Failing:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 4096:
                raise OSError(code, os.strerror(code))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(sio.os, "fdopen", lambda fd, mode: Failing(real(fd, mode)))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failing_disk_is_one_message_and_leaves_nothing(big_base, tmp_path, monkeypatch, capsys, code):
    _, _, lora = big_base
    base = str(tmp_path / "base.safetensors")
    tiny.save_checkpoint(tiny_model("sd1"), base)
    before = set(os.listdir(tmp_path))
    _fail_writes_with(monkeypatch, code)
    rc = cli.main(["merge", "--model", base, "--lora", lora, "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and os.strerror(code) in err and "nothing was written" in err and "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before          # no final file, no temp file
