"""The exercise system: chapter 1's checkers, the student-notebook generator, and `ptm-course grade`.

Every checker must pass the reference solution (taken from the solution notebook itself), report
the student stub as not attempted, and fail typical wrong answers with the right hint. The wrong
answers are written out here, independently of the mistake models inside the checkers.
The grading tests start a few checker processes: one module-scoped run grades the student notebook,
a deliberately broken one and an invalid file; the console script grades the solution notebook.
Attacks on the grader are in test_grader_attacks.py."""
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch

from exercise_helpers import (
    ROOT, assert_not_attempted, assert_student_notebook, assert_unchanged_by_nbdev_clean, functions_of, solution_notebook,
    student_notebook)
from ptm_course import exercises as ex
from ptm_course.checks import gradient_descent as gd

CHAPTER = "01_gradient_descent"
SOLUTION, STUDENT = solution_notebook(CHAPTER), student_notebook(CHAPTER)
EXERCISES = ["mse_gradient", "numerical_gradient", "sgd_momentum_step", "adam_step",
             "max_stable_learning_rate", "two_layer_mlp_gradients", "warmup_cosine_lr"]
TIMEOUT = 10  # seconds per exercise when grading (starting a checker process has a limit of its own)


REFERENCE, STUBS = functions_of(SOLUTION, EXERCISES), functions_of(STUDENT, EXERCISES)
CHECKERS = {name: getattr(gd, f"check_{name}") for name in EXERCISES}


# ---- typical wrong answers, per exercise: (function, words the hint must contain) ----

def _central(f, x, eps, scale=2.0, forward=False):
    g = torch.zeros_like(x)
    for i in range(len(x)):
        e = torch.zeros_like(x); e[i] = eps
        g[i] = (f(x + e) - f(x)) / eps if forward else (f(x + e) - f(x - e)) / (scale * eps)
    return g

def _not_restored(f, x, eps=1e-5):
    g = torch.zeros_like(x)
    for i in range(len(x)):
        x[i] += eps; up = f(x); x[i] -= 2 * eps
        g[i] = (up - f(x)) / (2 * eps)
    return g

def _adam(p, g, m, v, t, lr, b1, b2, eps, correct=True, eps_inside=False, t0=0, return_hat=False):
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    mh, vh = (m / (1 - b1 ** (t + t0)), v / (1 - b2 ** (t + t0))) if correct else (m, v)
    step = mh / ((vh + eps).sqrt() if eps_inside else vh.sqrt() + eps)
    return (p - lr * step, mh, vh) if return_hat else (p - lr * step, m, v)

def _mlp(X, Y, W1, b1, W2, b2, relu_grad=True, bias_mean=False, per_example_only=False):
    Z = X @ W1 + b1; H = Z.clamp(min=0); out = H @ W2 + b2
    d = 2 * (out - Y) / (len(X) if per_example_only else Y.numel())
    dH = d @ W2.T
    dZ = dH * (Z > 0) if relu_grad else dH
    red = (lambda t: t.mean(0)) if bias_mean else (lambda t: t.sum(0))
    return X.T @ dZ, red(dZ), H.T @ d, red(d)

def _schedule(s, base, W, T, m=0.0, warm_from_zero=False, use_min=True, use_pi=True):
    if s < W: return base * (s if warm_from_zero else s + 1) / W
    lo, p = (m if use_min else 0.0), (s - W) / (T - W)
    return lo + (base - lo) * (1 + math.cos((math.pi if use_pi else 1) * p)) / 2

WRONG = {
    "mse_gradient": [
        (lambda X, y, w: 2 * X.T @ (X @ w - y), "1/N"),
        (lambda X, y, w: 2 / len(X) * X.T @ (y - X @ w), "sign"),
        (lambda X, y, w: X.T @ (X @ w - y) / len(X), "factor 2"),
    ],
    "numerical_gradient": [
        (lambda f, x, eps=1e-5: _central(f, x, eps, forward=True), "one-sided"),
        (lambda f, x, eps=1e-5: _central(f, x, eps, scale=1.0), "2 * eps"),
        (_not_restored, None),  # message: changed its input in place
    ],
    "sgd_momentum_step": [
        (lambda p, g, v, lr, mu: (p - lr * v, mu * v + g), "old velocity"),
        (lambda p, g, v, lr, mu: (p - lr * (mu * v + (1 - mu) * g), mu * v + (1 - mu) * g), "dampened"),
        (lambda p, g, v, lr, mu: (p - (mu * v + lr * g), mu * v + lr * g), "learning rate out of the velocity"),
        (lambda p, g, v, lr, mu: (p - lr * (v + mu * g), v + mu * g), "wrong term"),
        (lambda p, g, v, lr, mu: (p - lr * (g + mu * (mu * v + g)), mu * v + g), "Nesterov"),
    ],
    "adam_step": [
        (lambda *a: _adam(*a, correct=False), "no bias correction"),
        (lambda *a: _adam(*a, eps_inside=True), "outside the square root"),
        (lambda *a: _adam(*a, t0=-1), None),  # NaN at t = 1: message says so
        (lambda *a: _adam(*a, return_hat=True), "running averages"),
    ],
    "max_stable_learning_rate": [
        (lambda A: 1 / torch.linalg.eigvalsh(A).max().item(), "twice"),
        (lambda A: 2 / torch.linalg.eigvalsh(A).min().item(), "flattest"),
        (lambda A: 2 / A.trace().item(), "trace"),
    ],
    "two_layer_mlp_gradients": [
        (lambda *a: _mlp(*a, relu_grad=False), "ReLU"),
        (lambda *a: _mlp(*a, bias_mean=True), "sums over the examples"),
        (lambda *a: _mlp(*a, per_example_only=True), "N*K"),
    ],
    "warmup_cosine_lr": [
        (lambda s, b, W, T, m=0.0: _schedule(s, b, W, T, m, warm_from_zero=True), "(s + 1)"),
        (lambda s, b, W, T, m=0.0: _schedule(s, b, W, T, m, use_min=False), "min_lr"),
        (lambda s, b, W, T, m=0.0: _schedule(s, b, W, T, m, use_pi=False), "pi"),
    ],
}


def test_the_notebooks_have_the_seven_exercises():
    for path in (SOLUTION, STUDENT):
        assert ex.find_exercises(nbformat.read(path, as_version=4)) == EXERCISES, path


@pytest.mark.parametrize("name", EXERCISES)
def test_checker_passes_the_reference_solution(name):
    result = CHECKERS[name](REFERENCE[name], show=False)
    assert result.passed, result


@pytest.mark.parametrize("name", EXERCISES)
def test_checker_reports_the_stub_as_not_attempted(name):
    assert_not_attempted(CHECKERS[name], STUBS[name], name)


@pytest.mark.parametrize("name", EXERCISES)
def test_checker_catches_typical_mistakes(name):
    assert len(WRONG[name]) >= 2
    for wrong, words in WRONG[name]:
        result = CHECKERS[name](wrong, show=False)
        assert result.status == ex.FAILED, (name, words, result)
        if words: assert words in result.hint, (name, words, result)
        else: assert "in place" in result.message or "NaN" in result.message, result


@pytest.mark.parametrize("name", EXERCISES)
def test_checker_survives_crashes_and_wrong_types(name):
    def crashes(*args, **kwargs): raise ValueError("oops, index 7")
    result = CHECKERS[name](crashes, show=False)
    assert result.status == ex.FAILED and "ValueError" in result.message and "oops, index 7" in result.message
    for returns in ([1.0, 2.0], None, "text", torch.zeros(2, 3, 4)):
        result = CHECKERS[name](lambda *a, r=returns, **k: r, show=False)
        assert result.status == ex.FAILED and result.message, (returns, result)
    assert CHECKERS[name](42, show=False).status == ex.FAILED  # not a function


def test_hints_never_print_the_answer():
    "A failed check says how far off the answer is, not what it should be."
    for wrong, _ in WRONG["mse_gradient"]:
        result = CHECKERS["mse_gradient"](wrong, show=False)
        text = result.message + result.hint
        assert not result.passed and "tensor(" not in text and "[" not in text


def test_check_output_carries_json_for_the_grader():
    bundle = gd.check_mse_gradient(REFERENCE["mse_gradient"], show=False).mimebundle()
    assert bundle[ex.CHECK_MIME] == {"exercise": "mse_gradient", "status": "passed", "passed": True,
                                     "message": bundle[ex.CHECK_MIME]["message"], "hint": ""}
    assert "PASS" in bundle["text/plain"] and "mse_gradient" in bundle["text/html"]


# ---- the generator ----

def test_student_notebooks_are_up_to_date():
    wanted = ex.student_notebooks(ROOT)
    assert STUDENT.resolve() in wanted
    stale = ex.stale_student_notebooks(ROOT)
    assert not stale, f"stale student notebooks {stale}: run `ptm-course exercises` and commit them"


def test_student_notebook_has_stubs_and_no_solutions_or_outputs():
    assert_student_notebook(CHAPTER, ("2 / X.shape[0] * (X.T @ residuals)", "m_hat = m / (1 - beta1**t)", "dZ = dH * (Z > 0)"),
                            len(EXERCISES))


def test_student_notebook_is_unchanged_by_nbdev_clean():
    "CI runs `nbdev-clean --fname exercises` before checking that generated files are up to date."
    assert_unchanged_by_nbdev_clean(STUDENT)


def test_generate_cli_writes_and_detects_stale_notebooks(tmp_path, monkeypatch):
    (tmp_path/"exercises"/"solutions").mkdir(parents=True)
    sol = tmp_path/"exercises"/"solutions"/"01_gradient_descent.ipynb"
    sol.write_text(SOLUTION.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert ex.generate_cli(check=True) == 1                       # missing
    assert not (tmp_path/"exercises"/"01_gradient_descent.ipynb").exists()
    assert ex.generate_cli() == 0
    assert (tmp_path/"exercises"/"01_gradient_descent.ipynb").read_text(encoding="utf-8") == STUDENT.read_text(encoding="utf-8")
    assert ex.generate_cli(check=True) == 0
    nb = nbformat.read(sol, as_version=4)
    nb.cells[0].source += "\n\nOne more sentence."
    nbformat.write(nb, sol)
    assert ex.generate_cli(check=True) == 1                       # stale
    cell = next(c for c in nb.cells if "def mse_gradient(" in c.source)
    cell.source = cell.source.replace(ex.END_SOLUTION, "")
    nbformat.write(nb, sol)
    assert ex.generate_cli() == 1                                 # unbalanced markers: an error, not a crash


# ---- grading ----

def _replace_function(nb, name: str, new_source: str) -> None:
    cell = next(c for c in nb.cells if c.cell_type == "code" and f"def {name}(" in c.source)
    cell.source = new_source

def broken_notebook(path: Path) -> Path:
    "The solution notebook with five exercises broken in five different ways."
    nb = nbformat.read(SOLUTION, as_version=4)
    _replace_function(nb, "numerical_gradient", "def numerical_gradient(f, x, eps=1e-5:\n    return x")   # syntax error
    _replace_function(nb, "sgd_momentum_step", "def sgd_momentum_step(p, g, v, lr, mu):\n    while True: pass")  # endless
    _replace_function(nb, "max_stable_learning_rate", "def max_stable_learning_rate(A):\n    import os\n    os._exit(1)")  # kills its process
    _replace_function(nb, "two_layer_mlp_gradients", (                                               # ignores interrupts
        "def two_layer_mlp_gradients(X, Y, W1, b1, W2, b2):\n    import time\n    while True:\n"
        "        try: time.sleep(0.05)\n        except KeyboardInterrupt: pass"))
    nb.cells = [c for c in nb.cells if "check_warmup_cosine_lr(" not in c.source]                 # check cell deleted: it comes back
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    "One in-process `grade` run over the student notebook, a broken notebook and an invalid file."
    tmp = tmp_path_factory.mktemp("class")
    broken = broken_notebook(tmp/"broken"/SOLUTION.name)  # graded against the solution whose functions it defines
    (tmp/"invalid.ipynb").write_text("{ this is not a notebook", encoding="utf-8")
    paths = [str(STUDENT), str(broken), str(tmp/"invalid.ipynb")]
    t0 = time.monotonic()
    rc = ex.grade_cli(paths, json_path=str(tmp/"class.json"), csv_path=str(tmp/"class.csv"), timeout=TIMEOUT)
    seconds = time.monotonic() - t0
    results = json.loads((tmp/"class.json").read_text(encoding="utf-8"))
    with open(tmp/"class.csv", newline="", encoding="utf-8") as f: rows = list(csv.DictReader(f))
    return dict(rc=rc, results=dict(zip(("student", "broken", "invalid"), results)), rows=rows, seconds=seconds)


def test_grade_student_notebook_scores_zero(graded):
    assert graded["rc"] == 0
    student = graded["results"]["student"]
    assert student["score"] == 0.0 and student["error"] is None
    assert [e["name"] for e in student["exercises"]] == EXERCISES
    assert all(e["status"] == "not attempted" and not e["passed"] for e in student["exercises"])


def test_grade_isolates_endless_loops_syntax_errors_and_dead_kernels(graded):
    broken = graded["results"]["broken"]
    status = {e["name"]: e["status"] for e in broken["exercises"]}
    assert status == {"mse_gradient": "passed", "numerical_gradient": "error", "sgd_momentum_step": "timeout",
                      "adam_step": "passed", "max_stable_learning_rate": "error",
                      "two_layer_mlp_gradients": "timeout", "warmup_cosine_lr": "passed"}, broken
    assert broken["score"] == pytest.approx(3 / 7)  # the deleted check cell does not cost warmup_cosine_lr: the grader's own check runs
    messages = {e["name"]: e["message"] for e in broken["exercises"]}
    assert "SyntaxError" in messages["numerical_gradient"]
    assert "died" in messages["max_stable_learning_rate"]
    assert f"longer than {TIMEOUT} s" in messages["two_layer_mlp_gradients"]
    problems = " ".join(broken["problems"])
    assert "fresh process" in problems and "max_stable_learning_rate" in problems
    # five exercises broken, two of them endless: bounded by the time limit, not by the loops
    assert broken["seconds"] < 4 * TIMEOUT + 40, broken["seconds"]


def test_grade_reports_an_invalid_notebook(graded):
    invalid = graded["results"]["invalid"]
    assert invalid["score"] == 0.0 and invalid["exercises"] == [] and "not a notebook" in invalid["error"]


def test_grade_json_and_csv_have_the_required_fields(graded):
    for r in graded["results"].values():
        assert {"notebook", "score", "exercises", "error"} <= set(r) and 0.0 <= r["score"] <= 1.0
        for e in r["exercises"]: assert {"name", "passed", "message"} <= set(e)
    rows = graded["rows"]  # one per student; no LMS names here, so each is named by its path
    assert len(rows) == 3 and list(rows[0])[:5] == ["student", "name", "points", "max_points", "error"]
    assert set(EXERCISES) <= set(rows[0]) and {f"{n} status" for n in EXERCISES} <= set(rows[0])
    broken = next(r for r in rows if "broken/01_gradient_descent" in r["student"])
    assert [broken[n] for n in EXERCISES] == ["1", "0", "0", "1", "0", "0", "1"]
    assert (broken["points"], broken["max_points"]) == ("3", "7") and broken["sgd_momentum_step status"] == "timeout"
    assert "numerical_gradient: error" in broken["error"] and "SyntaxError" in broken["error"]
    assert "not a notebook" in next(r for r in rows if r["student"].endswith("invalid"))["error"]


def test_grade_usage_errors(tmp_path):
    assert ex.grade_cli([str(tmp_path/"nothing-here")]) == 2
    assert ex.grade_cli([str(tmp_path)]) == 2  # an empty folder
    assert ex.grade_cli([str(STUDENT)], timeout=0) == 2


def test_grade_console_script_scores_the_solution_one(tmp_path):
    json_path, csv_path = tmp_path/"r.json", tmp_path/"r.csv"
    res = subprocess.run([sys.executable, "-m", "ptm_course.cli", "grade", str(SOLUTION),
                          "--json", str(json_path), "--csv", str(csv_path), "--timeout", str(TIMEOUT)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "7/7 passed" in res.stdout and "PASS  warmup_cosine_lr" in res.stdout
    [result] = json.loads(json_path.read_text(encoding="utf-8"))
    assert result["score"] == 1.0 and [e["name"] for e in result["exercises"]] == EXERCISES
    assert all(e["passed"] for e in result["exercises"])
    with open(csv_path, newline="", encoding="utf-8") as f: [row] = list(csv.DictReader(f))
    assert row["points"] == row["max_points"] == "7" and all(row[n] == "1" for n in EXERCISES) and row["error"] == ""
