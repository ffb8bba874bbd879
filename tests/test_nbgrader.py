"""nbgrader interop: every exercise notebook carries nbgrader metadata on its answer and check cells
(kept by nbdev-clean), its check cells raise when a check does not pass, and a real nbgrader
(`generate_assignment`, then `autograde` of two submissions: all right and half right) scores
chapter 1 exactly as `ptm-course grade` does. The round trip runs two kernels under nbgrader and two
checker processes under `ptm-course grade`: about a minute on a busy 2-core machine."""
import copy
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from exercise_helpers import ROOT, passive_openmp_waits, solution_notebook, student_notebook
from ptm_course import exercises as ex

CHAPTER = "01_gradient_descent"
EXERCISES = ["mse_gradient", "numerical_gradient", "sgd_momentum_step", "adam_step",
             "max_stable_learning_rate", "two_layer_mlp_gradients", "warmup_cosine_lr"]
HALF_RIGHT = ["mse_gradient", "numerical_gradient", "sgd_momentum_step"]  # and adam_step wrong, the rest untouched
ADAM_WITHOUT_BIAS_CORRECTION = '''def adam_step(param, grad, m, v, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad**2
    return param - lr * m / (v.sqrt() + eps), m, v'''
SOLUTIONS = sorted((ROOT/"exercises"/"solutions").glob("*.ipynb"))


@pytest.mark.parametrize("path", SOLUTIONS + [student_notebook(p.stem) for p in SOLUTIONS], ids=lambda p: str(p.relative_to(ROOT)))
def test_answer_and_check_cells_carry_nbgrader_metadata(path):
    nb = nbformat.read(path, as_version=4)
    names = ex.find_exercises(nb)
    for name in names:
        [answer] = [c for c in nb.cells if c.cell_type == "code" and ex._cell_defines(c.source, name)]
        [check] = [c for c in nb.cells if c.cell_type == "code" and name in ex.check_calls(c.source)]
        assert answer.metadata["nbgrader"] == {"grade": False, "grade_id": name, "locked": False, "schema_version": 3,
                                               "solution": True, "task": False}, name
        assert check.metadata["nbgrader"] == {"grade": True, "grade_id": f"check_{name}", "locked": True, "points": 1,
                                              "schema_version": 3, "solution": False, "task": False}, name
        assert check.source == f"result = check_{name}({name})\nassert result.passed, result.message"
    # no other cell claims to be graded, and no solution region sits outside a solution cell
    marked = [c for c in nb.cells if "nbgrader" in c.metadata]
    assert len(marked) == 2 * len(names)
    assert not [c for c in nb.cells if ex.BEGIN_SOLUTION in c.source and not c.metadata.get("nbgrader", {}).get("solution")]


def test_nbdev_is_configured_to_keep_the_nbgrader_metadata():
    import tomllib
    cfg = tomllib.loads((ROOT/"pyproject.toml").read_text(encoding="utf-8"))["tool"]["nbdev"]
    assert cfg["allowed_cell_metadata_keys"] == ["nbgrader"]


def _nbgrader(root: Path, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "nbgrader", *args, "--force"], cwd=root, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "[ERROR]" not in out, out[-4000:]
    return out


def _filled(release, solution, right: list[str], replace: dict[str, str]):
    "The released notebook with the answers of `right` taken from the solution and the cells of `replace` rewritten."
    nb, by_id = copy.deepcopy(release), {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in solution.cells}
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in right: cell.source = by_id[gid].source
        if gid in replace: cell.source = replace[gid]
    return nb


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    (root/"nbgrader_config.py").write_text(
        "c = get_config()\n"
        "c.CourseDirectory.course_id = 'ptm-course'\n"
        f"c.CourseDirectory.root = {str(root)!r}\n"
        "c.ExecutePreprocessor.timeout = 300\n", encoding="utf-8")
    (root/"source"/"ps1").mkdir(parents=True)
    shutil.copy(solution_notebook(CHAPTER), root/"source"/"ps1"/f"{CHAPTER}.ipynb")
    generated = _nbgrader(root, "generate_assignment", "ps1")
    release = nbformat.read(root/"release"/"ps1"/f"{CHAPTER}.ipynb", as_version=4)
    solution = nbformat.read(solution_notebook(CHAPTER), as_version=4)
    submissions = {"alice": _filled(release, solution, EXERCISES, {}),
                   "bob": _filled(release, solution, HALF_RIGHT, {"adam_step": ADAM_WITHOUT_BIAS_CORRECTION})}
    for student, nb in submissions.items():
        (root/"submitted"/student/"ps1").mkdir(parents=True)
        nbformat.write(nb, root/"submitted"/student/"ps1"/f"{CHAPTER}.ipynb")
    with passive_openmp_waits():
        _nbgrader(root, "autograde", "ps1")
        rc = ex.grade_cli([str(root/"submitted")], csv_path=str(root/"book.csv"), timeout=60,
                          id_pattern=r"submitted/(?P<id>[^/]+)/")
    assert rc == 0
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{root/'gradebook.db'}") as gb:
        nbgrader = {s: {n: gb.find_grade(f"check_{n}", CHAPTER, "ps1", s).score for n in EXERCISES} for s in submissions}
        totals = {s: gb.find_submission("ps1", s).score for s in submissions}
        max_score = gb.find_assignment("ps1").max_score
    with open(root/"book.csv", newline="", encoding="utf-8") as f: rows = {r["student"]: r for r in csv.DictReader(f)}
    return dict(release=release, generated=generated, nbgrader=nbgrader, totals=totals, max_score=max_score, rows=rows)


def test_nbgrader_releases_the_solution_notebook_with_stubs(round_trip):
    release = round_trip["release"]
    answers = [c for c in release.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert len(answers) == 7 and all("raise NotImplementedError" in c.source and ex.BEGIN_SOLUTION not in c.source for c in answers)


def test_nbgrader_and_ptm_course_grade_agree(round_trip):
    assert round_trip["max_score"] == 7
    assert round_trip["totals"] == {"alice": 7, "bob": 3}
    for student, by_exercise in round_trip["nbgrader"].items():
        row = round_trip["rows"][student]
        assert float(row["points"]) == round_trip["totals"][student] and row["max_points"] == "7"
        assert {n: int(row[n]) for n in EXERCISES} == {n: int(s) for n, s in by_exercise.items()}, student
    assert round_trip["rows"]["bob"]["adam_step status"] == "failed"
