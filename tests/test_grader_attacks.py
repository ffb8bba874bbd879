"""`ptm-course grade` cannot be fooled: every way a submission could forge its score, shrink its
denominator, or reach a classmate's submission or the installed checkers is tried here, each as a
notebook built from chapter 1's student notebook, and each must score exactly what its honest work
deserves. The honest cases (all right, half right, a syntax error, endless loops, crashes) are
graded in the same class.

One `grade_class` run grades the whole class (about 15 checker processes; a minute or two on a busy
2-core machine). The attacks that write run against this worktree's installed checks module: the
test puts it back whatever happens, and also asserts that the grader already did."""
import copy
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

from exercise_helpers import ROOT, passive_openmp_waits, solution_notebook, student_notebook
from ptm_course import exercises as ex

CHAPTER = "01_gradient_descent"
EXERCISES = ["mse_gradient", "numerical_gradient", "sgd_momentum_step", "adam_step",
             "max_stable_learning_rate", "two_layer_mlp_gradients", "warmup_cosine_lr"]
TIMEOUT = 10  # seconds per exercise
SOLUTION_NB = nbformat.read(solution_notebook(CHAPTER), as_version=4)
STUDENT_NB = nbformat.read(student_notebook(CHAPTER), as_version=4)
INSTALLED_CHECKS = ROOT/"ptm_course"/"checks"/"gradient_descent.py"
MARK = "ptm-grade-attack-left-running"


def _cell_of(nb, name: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and f"def {name}(" in c.source)


def submission(solved=(), replace=None, extra=(), drop_checks=False):
    "The student notebook with `solved` exercises taken from the solution, cells replaced, and `extra` cells after the imports."
    nb = copy.deepcopy(STUDENT_NB)
    for name in solved: nb.cells[_cell_of(nb, name)].source = SOLUTION_NB.cells[_cell_of(SOLUTION_NB, name)].source
    for name, source in (replace or {}).items(): nb.cells[_cell_of(nb, name)].source = source
    if drop_checks: nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and ex.check_calls(c.source))]
    nb.cells[2:2] = [nbformat.v4.new_code_cell(src) for src in extra]
    return nb


def stub_with(name: str, body: str) -> str:
    "The student stub of `name` with `body` (indented 4) run before its `raise NotImplementedError`."
    stub = STUDENT_NB.cells[_cell_of(STUDENT_NB, name)].source
    head, tail = stub.split("    # YOUR CODE HERE")
    return head + "".join(f"    {line}\n" for line in body.strip().split("\n")) + "    # YOUR CODE HERE" + tail


# ---- the attacks: each added cell gave 7/7 (or shrank the denominator) with a grader that trusted the notebook ----

FORGED_MIME = f"""from IPython.display import display
for name in {EXERCISES!r}:
    display({{{ex.CHECK_MIME!r}: {{"exercise": name, "status": "passed", "passed": True, "message": "ok", "hint": ""}},
             "text/plain": "[PASS]"}}, raw=True)"""

PATCHED_REPORT = """import ptm_course.exercises as E
_real_report = E.report
E.report = lambda r: _real_report(E.CheckResult(r.exercise, "passed", "correct on every test case"))"""

REDEFINED_CHECKS = f"""from ptm_course.exercises import CheckResult, report
def _always_passes(name):
    def check(fn, *args, **kwargs): return report(CheckResult(name, "passed", "correct on every test case"))
    return check
for _name in {EXERCISES!r}: globals()["check_" + _name] = _always_passes(_name)"""

PATCHED_TO_DICT = """from ptm_course.exercises import CheckResult
CheckResult.to_dict = lambda self: {"exercise": self.exercise, "status": "passed", "passed": True, "message": "", "hint": ""}
CheckResult.passed = property(lambda self: True)"""

APPEND_TO_CHECKS = ("\n# appended by a submission: every check passes\n"
                    "from ..exercises import CheckResult as _CR\n"
                    "for _n in [n for n in globals() if n.startswith('check_')]:\n"
                    "    globals()[_n] = (lambda e: lambda fn, *a, **k: _CR(e, 'passed', 'pwned'))(_n[len('check_'):])\n")

def appends_to(paths_expr: str) -> str:
    return f"""import os
import ptm_course.checks.gradient_descent as _m
for _path in {paths_expr}:
    try:
        os.chmod(_path, 0o644)
        with open(_path, "a") as _f: _f.write({APPEND_TO_CHECKS!r})
    except OSError: pass"""

def leaves_processes() -> str:
    return f"""import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{MARK}-group"])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{MARK}-session"], start_new_session=True)"""

FORGED_LINES = f"""import json, os
for _name in {EXERCISES!r}:
    _line = json.dumps({{"event": "result", "name": _name, "status": "passed", "message": "", "hint": ""}}) + "\\n"
    print(_line)
    for _fd in range(1, 64):
        try: os.write(_fd, _line.encode())
        except OSError: pass"""


def build_class(folder: Path) -> dict[str, tuple[Path, int, dict]]:
    "{label: (path, honest points out of 7, expected statuses of some exercises)}; file names sort attacks before the rest."
    classmate = folder/"z_classmate_all_right.ipynb"
    installed = repr(str(INSTALLED_CHECKS))
    cases = {
        # attacks from the issue: an added cell
        "forged check output": ("a01.ipynb", submission(extra=[FORGED_MIME]), 0, {}),
        "patched report": ("a02.ipynb", submission(extra=[PATCHED_REPORT]), 0, {}),
        "redefined checks": ("a03.ipynb", submission(extra=[REDEFINED_CHECKS], replace={
            "mse_gradient": STUDENT_NB.cells[_cell_of(STUDENT_NB, "mse_gradient")].source + "\n\n" +
                            "def check_mse_gradient(fn, *args, **kwargs):\n    return None\n"}), 0, {}),
        "patched CheckResult.to_dict": ("a04.ipynb", submission(extra=[PATCHED_TO_DICT], replace={
            "adam_step": stub_with("adam_step", "pass") + "\n" + PATCHED_TO_DICT}), 0, {}),
        # one solved, check cells deleted, renamed as an LMS download: still out of 7
        "deleted checks, LMS name": ("doefrank_12345_01_gradient_descent.ipynb",
                                     submission(solved=["mse_gradient"], drop_checks=True), 1, {"mse_gradient": "passed"}),
        # isolation: in an added cell and, where the cell would not run, in the function the checker calls
        "deletes a classmate": ("a05.ipynb", submission(
            extra=[f"import os\nos.remove({str(classmate)!r})"],
            replace={"mse_gradient": stub_with("mse_gradient", f"import os\nos.remove({str(classmate)!r})")}), 0, {}),
        "appends to the checks module": ("a06.ipynb", submission(
            extra=[appends_to("[_m.__file__]")],
            replace={"mse_gradient": stub_with("mse_gradient", appends_to(f"[_m.__file__, {installed}]"))}), 0, {}),
        "leaves processes running": ("a07.ipynb", submission(
            extra=[leaves_processes()], replace={"mse_gradient": stub_with("mse_gradient", leaves_processes())}), 0, {}),
        # attacks of our own: forged result lines on every file descriptor, exiting the process from a function
        "forged result lines": ("a08.ipynb", submission(solved=["warmup_cosine_lr"], replace={
            "mse_gradient": stub_with("mse_gradient", FORGED_LINES),
            "adam_step": stub_with("adam_step", "raise SystemExit(0)")}), 1, {"adam_step": "failed", "warmup_cosine_lr": "passed"}),
        # honest work
        "all right": ("h1_all_right.ipynb", submission(solved=EXERCISES), 7, {n: "passed" for n in EXERCISES}),
        "half right": ("h2_half_right.ipynb", submission(solved=["mse_gradient", "numerical_gradient", "sgd_momentum_step"], replace={
            "adam_step": stub_with("adam_step", "m = beta1 * m + (1 - beta1) * grad\nv = beta2 * v + (1 - beta2) * grad**2\n"
                                                "return param - lr * m / (v.sqrt() + eps), m, v")}), 3,
                       {"adam_step": "failed", "max_stable_learning_rate": "not attempted"}),
        "syntax error": ("h3_syntax_error.ipynb", submission(solved=EXERCISES, replace={
            "numerical_gradient": "def numerical_gradient(f, x, eps=1e-5:\n    return x"}), 6, {"numerical_gradient": "error"}),
        "endless loops": ("h4_endless_loops.ipynb", submission(solved=EXERCISES, replace={
            "sgd_momentum_step": "def sgd_momentum_step(p, g, v, lr, mu):\n    while True: pass",
            "two_layer_mlp_gradients": ("def two_layer_mlp_gradients(X, Y, W1, b1, W2, b2):\n    import time\n    while True:\n"
                                        "        try: time.sleep(0.05)\n        except KeyboardInterrupt: pass")}), 5,
                          {"sgd_momentum_step": "timeout", "two_layer_mlp_gradients": "timeout"}),
        "crashes": ("h5_crashes.ipynb", submission(solved=EXERCISES, replace={
            "max_stable_learning_rate": "def max_stable_learning_rate(A):\n    import os\n    os._exit(1)",
            "adam_step": "def adam_step(*args, **kwargs):\n    import os\n    os.abort()",
            "warmup_cosine_lr": SOLUTION_NB.cells[_cell_of(SOLUTION_NB, "warmup_cosine_lr")].source + "\nimport os\nos._exit(1)"}), 5,
                    {"max_stable_learning_rate": "error", "adam_step": "error", "warmup_cosine_lr": "passed"}),
        "untouched stub after the attacks": ("y_stub.ipynb", submission(), 0, {n: "not attempted" for n in EXERCISES}),
        "classmate": (classmate.name, submission(solved=EXERCISES), 7, {n: "passed" for n in EXERCISES}),
    }
    out = {}
    for label, (name, nb, points, statuses) in cases.items():
        nbformat.write(nb, folder/name)
        out[label] = (folder/name, points, statuses)
    return out


def _processes_with(mark: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if mark.encode() in f.read(): found.append(int(pid))
        except OSError: pass
    return found


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("class")
    cases = build_class(folder)
    classmate_before = cases["classmate"][0].read_bytes()
    installed_before = INSTALLED_CHECKS.read_bytes()
    try:
        with passive_openmp_waits():
            grades = ex.grade_class(sorted(p for p, _, _ in cases.values()), timeout=TIMEOUT)
        installed_after = INSTALLED_CHECKS.read_bytes()
        leftovers = _processes_with(MARK) if os.path.isdir("/proc") else []
    finally:
        if INSTALLED_CHECKS.read_bytes() != installed_before: INSTALLED_CHECKS.write_bytes(installed_before)
        for pid in _processes_with(MARK) if os.path.isdir("/proc") else []:
            try: os.kill(pid, 9)
            except OSError: pass
    by_path = {Path(g.notebook): g for g in grades}
    return dict(cases=cases, grades={label: by_path[p] for label, (p, _, _) in cases.items()},
                classmate_ok=cases["classmate"][0].exists() and cases["classmate"][0].read_bytes() == classmate_before,
                installed_ok=installed_after == installed_before, leftovers=leftovers)


LABELS = ["forged check output", "patched report", "redefined checks", "patched CheckResult.to_dict", "deleted checks, LMS name",
          "deletes a classmate", "appends to the checks module", "leaves processes running", "forged result lines",
          "all right", "half right", "syntax error", "endless loops", "crashes", "untouched stub after the attacks", "classmate"]


@pytest.mark.parametrize("label", LABELS)
def test_each_submission_scores_its_honest_score(graded, label):
    _, points, statuses = graded["cases"][label]
    g = graded["grades"][label]
    assert g.error is None, g
    assert [e.name for e in g.exercises] == EXERCISES, g            # always out of the reference's seven
    assert g.passed == points, json.dumps(g.to_dict(), indent=1)
    status = {e.name: e.status for e in g.exercises}
    for name, want in statuses.items(): assert status[name] == want, (name, g.to_dict())
    assert g.reference == CHAPTER


def test_the_lms_file_name_does_not_pick_the_exercises(graded):
    g = graded["grades"]["deleted checks, LMS name"]
    assert len(g.exercises) == 7 and g.score == pytest.approx(1 / 7)


def test_a_classmate_deleted_by_a_submission_is_put_back_and_graded(graded):
    assert graded["classmate_ok"]
    assert any("another submission" in p and "put back" in p for p in graded["grades"]["deletes a classmate"].problems)


def test_the_installed_checks_are_restored_and_later_students_unaffected(graded):
    assert graded["installed_ok"], "the grader did not restore the installed checks module"
    notes = " ".join(graded["grades"]["appends to the checks module"].problems)
    assert "gradient_descent.py" in notes and "restored" in notes
    assert graded["grades"]["untouched stub after the attacks"].passed == 0


def test_no_process_of_a_submission_survives_its_grading(graded):
    assert graded["leftovers"] == []


def test_honest_failures_say_why(graded):
    msg = lambda label, name: next(e for e in graded["grades"][label].exercises if e.name == name).message
    assert "SyntaxError" in msg("syntax error", "numerical_gradient") and "line 1" in msg("syntax error", "numerical_gradient")
    assert "longer than 10 s" in msg("endless loops", "sgd_momentum_step")
    assert "died" in msg("crashes", "max_stable_learning_rate") and "SIGABRT" in msg("crashes", "adam_step")
    assert any("not run by the grader" in p and "os._exit" in p for p in graded["grades"]["crashes"].problems)
    assert "SystemExit" in msg("forged result lines", "adam_step")


def test_answer_cells_that_reach_for_the_grader_are_flagged(graded):
    assert any("read it by hand" in p and "os" in p for p in graded["grades"]["appends to the checks module"].problems)
    assert not any("read it by hand" in p for p in graded["grades"]["all right"].problems)


def test_extract_answer_keeps_imports_and_definitions_only():
    a = ex.extract_answer("import math\nX = 3\n@staticmethod\ndef f(x):\n    return x\nprint('hi')\nclass C: pass", "f", 4)
    assert a.source.split("\n") == ["import math", "", "@staticmethod", "def f(x):", "    return x", "", "class C: pass"]
    assert [d.split(":")[0] for d in a.dropped] == ["line 2", "line 6"] and not a.error
    bad = ex.extract_answer("def f(x:\n    pass", "f")
    assert "SyntaxError" in bad.error and "line 1" in bad.error


def test_a_submission_is_matched_to_its_reference_by_its_functions():
    refs = ex.load_references(ROOT/"exercises"/"solutions")
    assert ex.match_reference(submission(), refs) == CHAPTER
    empty = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    with pytest.raises(ValueError, match="--reference"): ex.match_reference(empty, refs)


def test_the_class_gradebook_has_each_students_honest_points(graded, tmp_path):
    grades = list(graded["grades"].values())
    ex.write_csv(grades, tmp_path/"book.csv")
    ex.write_canvas(grades, tmp_path/"canvas.csv")
    import csv
    with open(tmp_path/"book.csv", newline="", encoding="utf-8") as f: rows = {r["student"]: r for r in csv.DictReader(f)}
    with open(tmp_path/"canvas.csv", newline="", encoding="utf-8") as f: canvas = list(csv.reader(f))
    assert len(rows) == len(LABELS) == len(canvas) - 1
    lms = rows["12345"]  # doefrank_12345_01_gradient_descent.ipynb: the id read from the LMS name
    assert (lms["name"], lms["points"], lms["max_points"], lms["mse_gradient status"]) == ("doefrank", "1", "7", "passed")
    for label, (path, points, _) in graded["cases"].items():
        row = rows.get(path.stem, lms if "12345" in path.name else None)
        assert row is not None and row["points"] == str(points), (label, row)
    assert canvas[0] == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", "01_gradient_descent"]
    assert ["doefrank", "12345", "", "", "", "1"] in canvas
