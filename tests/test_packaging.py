"""A regular install carries everything the library reads at run time.

`python -m build` makes the sdist and, from the sdist, the wheel, as `pip install .` or `pip install git+URL` do; the
wheel is installed (not editable) into a fresh virtual environment in a folder outside the repository, and there
`ptm-course doctor`, `ptm-course tour --fast` and the data loaders run. The fresh environment gets this
environment's dependencies (torch and friends, several GB) through a `.pth` line naming its site-packages, instead of
a second download; that line adds the folder only, so the repository's editable-install hook stays inactive, and
the test checks that `ptm_course` is imported from the fresh environment."""
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = sorted(l.split()[1] for l in (ROOT/"ptm_course"/"bundled"/"SHA256SUMS").read_text().splitlines() if l.strip())


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build", reason="the `build` package is in the dev extra: pip install -e '.[dev]'")
    out, clone = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("clone")
    # What a clean clone holds (tracked files, and new ones git does not ignore), so that no build/ or egg-info
    # left in the working tree by an earlier build can add files that a clone would not get.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT/name
        if src.is_file(): (clone/name).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(src, clone/name)
    # --no-isolation: use this environment's setuptools rather than download one; the wheel is built from the sdist
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(clone)],
                       capture_output=True, text=True, cwd=out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_the_sdist_and_the_wheel_carry_the_bundled_data(dist):
    wheel, = dist.glob("*.whl")
    sdist, = dist.glob("*.tar.gz")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as t: in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for name in ["SHA256SUMS"] + BUNDLED:
        assert f"ptm_course/bundled/{name}" in in_wheel, f"the wheel lacks ptm_course/bundled/{name}"
        assert f"ptm_course/bundled/{name}" in in_sdist, f"the sdist lacks ptm_course/bundled/{name}"
    assert "ptm_course/checks/gradient_descent.py" in in_wheel


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory):
    "A fresh virtual environment outside the repository with the wheel installed in it; returns its bin folder."
    home = tmp_path_factory.mktemp("fresh")
    venv = home/"venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv/("Scripts" if os.name == "nt" else "bin")
    site = Path(subprocess.run([str(bin_dir/"python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site/"course-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel, = dist.glob("*.whl")
    subprocess.run([str(bin_dir/"python"), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                   check=True, cwd=home)
    return bin_dir


def _run(installed, *args, timeout=600):
    home = installed.parent.parent
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PTM_DATA_DIR", "VIRTUAL_ENV"}}
    env.update(PTM_CACHE_DIR=str(home/"cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    return subprocess.run([str(a) for a in args], cwd=home, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_installed_wheel_is_what_runs_and_reads_its_data(installed):
    code = ("import ptm_course, ptm_course.data as d; print(ptm_course.__file__); "
            "s = d.review_splits(); x, y = d.mnist_tensors(train=False); n = d.austen_novels(); "
            "print(len(x), sum(map(len, s.values())), len(n))")
    r = _run(installed, installed/"python", "-c", code)
    assert r.returncode == 0, r.stderr[-3000:]
    path, counts = r.stdout.split("\n")[:2]
    assert Path(path).is_relative_to(installed.parent) and not Path(path).is_relative_to(ROOT), path
    assert counts.split() == ["10000", "12752", "6"]


def test_doctor_and_the_fast_tour_pass_from_the_wheel(installed):
    doctor = _run(installed, installed/"ptm-course", "doctor")
    assert doctor.returncode == 0 and "All checks passed" in doctor.stdout, doctor.stdout[-3000:] + doctor.stderr[-3000:]
    assert "[FAIL]" not in doctor.stdout
    tour = _run(installed, installed/"ptm-course", "tour", "--fast", "--out", "tour")
    assert tour.returncode == 0, tour.stdout[-3000:] + tour.stderr[-3000:]
    assert (installed.parent.parent/"tour"/"report.md").exists()
