"""`ptm-course doctor` passes on a good install and fails, naming the file, on damaged data."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ptm_course import data


def ptm_course(*args, env=None):
    script = Path(sys.executable).parent/"ptm-course"  # the console script the README tells users to run
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ptm_course.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_doctor_passes_here():
    res = ptm_course("doctor")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [l for l in res.stdout.splitlines() if l.startswith("[")]
    assert lines and all(l.startswith("[OK]") for l in lines), res.stdout
    for expected in ("Python", "torch", "torchvision", "transformers", "austen.txt.gz", "bundled model loads offline", "device:"):
        assert expected in res.stdout, expected


def test_doctor_fails_on_corrupt_data(tmp_path):
    copy = tmp_path/"bundled"
    shutil.copytree(data.bundled_dir(), copy)
    p = copy/"mnist"/"train-labels-idx1-ubyte.gz"
    b = bytearray(p.read_bytes()); b[2000] ^= 0xFF; p.write_bytes(bytes(b))
    res = ptm_course("doctor", env={"PTM_DATA_DIR": str(copy), "PTM_CACHE_DIR": str(tmp_path/"cache")})
    assert res.returncode != 0
    fails = [l for l in res.stdout.splitlines() if l.startswith("[FAIL]")]
    assert any("train-labels-idx1-ubyte.gz" in l and "corrupt" in l for l in fails), res.stdout
    assert "[OK]   Python" in res.stdout, "one bad file must not hide the other checks"


def test_no_command_prints_help():
    res = ptm_course()
    assert res.returncode == 2 and "doctor" in res.stdout
