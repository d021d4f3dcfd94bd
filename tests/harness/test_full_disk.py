"""Every writer on a full disk (issue 21, item 10): one line naming the file, and no 0-byte,
temporary or half-written output left behind.

A full disk is simulated with the file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored): a write past
it fails in the kernel as a write on a full disk does (EFBIG instead of ENOSPC), whatever code
does the writing, so a writer that bypasses the project's atomic writer is caught too. Each
command runs in a subprocess that sets the limit first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXFSZ"), reason="POSIX file-size limit")

LIMITED = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if sys.argv[2] == "fvd":
    from fvdiffusion.cli import app
    sys.argv = ["fvd", *sys.argv[3:]]
    app()
else:
    exec(sys.argv[3])
"""


def limited(limit: int, *argv: str, code: str | None = None) -> subprocess.CompletedProcess:
    args = ["fvd", *argv] if code is None else ["python", code]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("error: ")]


def leftovers(root: Path) -> list[Path]:
    """0-byte files, temporary files and hidden staging folders under ``root``."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and (path.stat().st_size == 0 or path.name.endswith(".tmp")):
            found.append(path)
        if path.name.startswith(".") and (".partial-" in path.name or ".export-" in path.name):
            found.append(path)
    return found


def test_convert_aesthetic_on_a_full_disk(tmp_path):
    state = {f"layers.{i}.{p}": torch.randn(shape if p == "weight" else shape[:1])
             for i, shape in ((0, (1024, 768)), (2, (128, 1024)), (4, (64, 128)), (6, (16, 64)), (7, (1, 16)))
             for p in ("weight", "bias")}
    torch.save(state, tmp_path / "predictor.pth")
    out = tmp_path / "out" / "aesthetic.safetensors"
    (lines,) = [error_lines(limited(200_000, "convert", "aesthetic", str(tmp_path / "predictor.pth"),
                                    "--out", str(out)))]
    assert len(lines) == 1 and str(out) in lines[0] and "File too large" in lines[0], lines
    assert "corrupt" not in lines[0] and not out.exists() and leftovers(tmp_path / "out") == []


def test_export_diffusers_ddpm_on_a_full_disk_leaves_no_folder(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "mnist-ddpm"
    lines = error_lines(limited(100_000, "export", "diffusers-ddpm", "--out", str(out)))
    assert len(lines) == 1 and str(out) in lines[0] and "nothing written" in lines[0], lines
    assert not out.exists() and leftovers(tmp_path) == [], list(tmp_path.iterdir())


def test_export_diffusers_ddpm_on_a_full_disk_keeps_the_previous_export(tmp_path):
    pytest.importorskip("diffusers")
    from fvdiffusion.integrations.diffusers.export_mnist import write_folder_atomically

    out = tmp_path / "mnist-ddpm"
    out.mkdir()
    (out / "model_index.json").write_text("{}\n")

    def half_then_full(staging: Path) -> None:
        staging.mkdir()
        (staging / "model_index.json").write_text('{"new": 1}\n')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="mnist-ddpm: writing the pipeline failed, nothing written: No space left"):
        write_folder_atomically(out, half_then_full)
    assert (out / "model_index.json").read_text() == "{}\n" and leftovers(tmp_path) == []


def test_sample_on_a_full_disk_names_the_file(tmp_path):
    out = tmp_path / "run"
    lines = error_lines(limited(300, "sample", "--particles", "4", "--steps", "2", "--no-progress", "--out", str(out)))
    assert len(lines) == 1 and str(out / "fvd.png") in lines[0] and "File too large" in lines[0], lines
    assert leftovers(tmp_path) == [] and not (out / "fvd.png").exists()


def test_a_record_that_does_not_fit_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "records.jsonl"
    code = (f"from pathlib import Path\nfrom fvdiffusion.durable import RecordLog\n"
            f"log = RecordLog(Path({str(path)!r}), ('i',))\nlog.append({{'i': 0}})\n"
            f"try:\n    log.append({{'i': 1, 'pad': 'x' * 5000}})\nexcept OSError as exc:\n    print(exc)\n")
    done = limited(2000, code=code)
    assert done.returncode == 0, done.stderr
    assert str(path) in done.stdout and "File too large" in done.stdout, done.stdout
    assert path.read_text() == '{"i": 0}\n'
    fresh = tmp_path / "fresh.jsonl"
    done = limited(100, code=code.replace(str(path), str(fresh)).replace("log.append({'i': 0})\n", ""))
    assert str(fresh) in done.stdout and not fresh.exists(), done.stdout  # no 0-byte file
