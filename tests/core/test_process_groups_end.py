"""Process groups end cleanly (issue 21, item 8): the launcher's workers die with their parent
(SIGINT, SIGTERM, SIGKILL), Ctrl-C is one line on rank 0 only, FVD_COLLECTIVE_TIMEOUT is the
groups' timeout, bad torchrun variables and a missing peer are one line, and a local group
listens on the loopback only.

The signal tests start the real ``fvd sample`` in a subprocess (a session of its own) and look
for its workers in /proc, so they run on Linux only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sharded_runs as runs
from fvdiffusion.cli import app
from fvdiffusion.errors import ShardFailedError
from fvdiffusion.launch import launch

LINUX = sys.platform.startswith("linux")
runner = CliRunner()
REPO = Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the loopback and the timeout ------------------------------------------------------------------

@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_a_local_group_listens_on_the_loopback_only():
    addresses = [a for rank in launch(runs.listening_addresses, nproc=2, every_rank=True, timeout_s=30) for a in rank]
    assert addresses  # rank 0's store at least
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 (as /proc writes them)
    assert set(addresses) <= loopback, addresses


def test_fvd_collective_timeout_is_the_launched_group_s_timeout(monkeypatch):
    monkeypatch.setenv("FVD_COLLECTIVE_TIMEOUT", "2")
    rank0 = launch(runs.collective_timing, (12.0,), nproc=2)
    assert rank0["env"] == "2.0" and rank0["raised"] and rank0["waited"] < 9, rank0


def test_the_rank_hosting_the_store_leaves_after_its_peers():
    """Rank 0 hosts the store: leaving first, a peer still polling it logs c10d's native stack."""
    assert launch(runs.leaving_order, (1.0, 30.0), nproc=2, timeout_s=60) is True
    # a peer that never comes is waited for at most the grace
    assert launch(runs.leaving_order, (6.0, 0.2), nproc=2, timeout_s=60) is False


def test_after_a_failure_the_others_get_at_most_the_timeout_to_stop():
    start = time.monotonic()
    with pytest.raises(ShardFailedError):
        launch(runs.failing_run_raising, (1, 2, "hang"), nproc=2, timeout_s=3)
    assert time.monotonic() - start < 25  # the grace was 30 s whatever the timeout


def test_bench_scaling_leaves_the_timeout_to_the_environment(monkeypatch, tmp_path):
    import fvdiffusion.launch as launch_module
    from fvdiffusion.bench.scaling import ScalingConfig, run_scaling

    seen = []
    monkeypatch.setattr(launch_module, "launch", lambda *a, **kw: seen.append(kw) or 0)
    run_scaling(ScalingConfig(quick=True, repeats=1, testbeds=("toy",), procs=(2,)), tmp_path)
    assert seen and all(kw.get("timeout_s") is None for kw in seen)


@pytest.mark.parametrize("argv", [["sample", "--nproc", "2", "--particles", "4", "--steps", "2"],
                                  ["bench", "scaling", "--quick"]], ids=["sample", "bench-scaling"])
def test_a_malformed_fvd_collective_timeout_is_one_line_before_anything_starts(argv, tmp_path):
    result = runner.invoke(app, argv + ["--out", str(tmp_path / "out")], env={"FVD_COLLECTIVE_TIMEOUT": "ten"})
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "FVD_COLLECTIVE_TIMEOUT='ten'" in lines[0], result.output
    assert not (tmp_path / "out").exists()


# --- torchrun's variables ------------------------------------------------------------------------

GOOD = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("name, value", [
    ("WORLD_SIZE", "two"), ("WORLD_SIZE", "0"), ("RANK", "x"), ("RANK", "2"), ("RANK", "-1"), ("LOCAL_RANK", "a"),
    ("MASTER_PORT", "http"), ("MASTER_PORT", "99999"), ("MASTER_ADDR", "no such host"), ("MASTER_ADDR", ""),
])
def test_a_malformed_torchrun_variable_is_one_line_naming_it(name, value, tmp_path):
    result = runner.invoke(app, ["sample", "--particles", "4", "--steps", "2", "--out", str(tmp_path)],
                           env={**GOOD, name: value})
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"{name}={value!r}" in lines[0], result.output


def test_a_missing_torchrun_variable_is_one_line_naming_it(tmp_path):
    env = {**GOOD, "MASTER_PORT": None}
    result = runner.invoke(app, ["sample", "--particles", "4", "--steps", "2", "--out", str(tmp_path)], env=env)
    assert result.exit_code == 2 and "MASTER_PORT is not" in result.output and \
        len(result.output.strip().splitlines()) == 1, result.output


def test_a_missing_peer_is_one_line_within_the_timeout(tmp_path):
    """Rank 1 alone: nobody serves rank 0's store. A subprocess, so that what c10d writes to the
    native stderr (a stack per connection try) is seen too."""
    env = {**os.environ, **GOOD, "MASTER_PORT": str(_free_port()), "FVD_COLLECTIVE_TIMEOUT": "2",
           "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fvdiffusion.cli", "sample", "--particles", "4", "--steps", "2",
                           "--out", str(tmp_path / "out"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not join the process group" in lines[0] and "RANK=1" in lines[0], done.stderr
    assert "2 s" in lines[0] and time.monotonic() - start < 60


def test_rank_zero_waiting_for_a_missing_peer_gives_up_at_the_timeout(tmp_path):
    env = {**GOOD, "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": str(_free_port()), "FVD_COLLECTIVE_TIMEOUT": "2"}
    start = time.monotonic()
    result = runner.invoke(app, ["sample", "--particles", "4", "--steps", "2", "--out", str(tmp_path)], env=env)
    assert result.exit_code == 2 and "could not join the process group" in result.output, result.output
    assert "1/2 clients joined" in result.output and time.monotonic() - start < 20


# --- signals: workers die with the parent, Ctrl-C is one line -----------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _spawned(pid: int) -> list[int]:
    """The launcher's workers among its children (not multiprocessing's resource tracker)."""
    found = []
    for child in _children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Stderr:
    """Collects a pipe in a thread, so that the test can wait for a marker without blocking."""

    def __init__(self, pipe) -> None:
        self.text, self.pipe = "", pipe
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.pipe.read(1), ""):
            self.text += chunk

    def wait_for(self, marker: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while marker not in self.text:
            assert time.monotonic() < deadline, f"no {marker!r} in: {self.text[-2000:]}"
            time.sleep(0.2)


def _messages(text: str) -> list[str]:
    """stderr without tqdm's progress updates (a line printed after an open bar follows its "]")."""
    parts = [p for line in text.split("\n") for p in line.split("\r")]
    parts = [p.rsplit("]", 1)[-1] if "%|" in p else p for p in parts]
    return [p.strip() for p in parts if p.strip()]


def _start(argv: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Stderr]:
    proc = subprocess.Popen([sys.executable, "-m", "fvdiffusion.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return proc, Stderr(proc.stderr)


LONG_SAMPLE = ["sample", "--particles", "8", "--steps", "1000", "--class", "3"]


@pytest.mark.skipif(not LINUX, reason="reads /proc")
@pytest.mark.parametrize("how", ["sigint_parent", "sigint_group", "sigint_group_starting", "sigterm_parent",
                                 "sigkill_parent"])
def test_nproc_workers_end_with_their_parent(how, tmp_path):
    proc, err = _start([*LONG_SAMPLE, "--nproc", "2", "--out", str(tmp_path / "out")])
    try:
        if how == "sigint_group_starting":  # Ctrl-C while the workers still import torch
            deadline = time.monotonic() + 120
            while len(_spawned(proc.pid)) < 2:
                assert time.monotonic() < deadline and proc.poll() is None, err.text
                time.sleep(0.05)
            time.sleep(0.3)
            how = "sigint_group"
        else:
            err.wait_for("%|", 180)  # rank 0 is sampling: the group is up
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # two ranks (and multiprocessing's resource tracker)
        if how == "sigint_group":
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            proc.send_signal({"sigint_parent": signal.SIGINT, "sigterm_parent": signal.SIGTERM,
                              "sigkill_parent": signal.SIGKILL}[how])
        code = proc.wait(timeout=60)
        deadline = time.monotonic() + 15
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], f"orphans left: {workers}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if how == "sigkill_parent":
        return
    err.thread.join(timeout=10)
    messages = _messages(err.text)
    assert code == 130, err.text
    want = "terminated by SIGTERM" if how == "sigterm_parent" else "stopped by the user"
    assert messages == [f"interrupted: {want}"], err.text


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_ctrl_c_under_torchrun_is_one_line_on_rank_zero_only(tmp_path):
    """Two ranks started as torchrun starts them (its variables), Ctrl-C to both at once."""
    port = str(_free_port())
    ranks = [_start([*LONG_SAMPLE, "--out", str(tmp_path / "out")],
                    env={"WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": port, "FVD_COLLECTIVE_TIMEOUT": "60"}) for r in range(2)]
    try:
        ranks[0][1].wait_for("%|", 180)
        for proc, _ in ranks:
            os.kill(proc.pid, signal.SIGINT)
        codes = [proc.wait(timeout=90) for proc, _ in ranks]
    finally:
        for proc, _ in ranks:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for _, err in ranks:
        err.thread.join(timeout=10)
    assert codes == [130, 130], [err.text for _, err in ranks]
    assert _messages(ranks[0][1].text) == ["interrupted: stopped by the user"], ranks[0][1].text
    assert _messages(ranks[1][1].text) == [], ranks[1][1].text


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_ctrl_c_during_bench_scaling_is_one_line_and_leaves_no_worker(tmp_path):
    proc, err = _start(["bench", "scaling", "--quick", "--testbeds", "mnist", "--out", str(tmp_path / "out")])
    try:
        deadline = time.monotonic() + 120
        while len(_spawned(proc.pid)) < 1:  # the first group (P = 1) is starting
            assert time.monotonic() < deadline and proc.poll() is None, err.text
            time.sleep(0.05)
        time.sleep(2.0)
        workers = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
        deadline = time.monotonic() + 15
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], f"orphans left: {workers}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err.thread.join(timeout=10)
    assert code == 130 and _messages(err.text) == ["interrupted: stopped by the user"], err.text
