"""What the exercise tests of every chapter share: where a chapter's notebooks are, the exercise
functions defined in them, the properties every checker must have, and `ptm-course grade` runs.

A chapter's test file (tests/test_exercises_ch*.py) imports these and keeps what is its own: the
typical wrong answers, written out independently of the checkers' mistake models, and the tests
of its oracles."""
import contextlib
import json
import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from ptm_course import exercises as ex

ROOT = Path(__file__).resolve().parents[1]


def solution_notebook(chapter: str) -> Path: return ROOT/"exercises"/"solutions"/f"{chapter}.ipynb"
def student_notebook(chapter: str) -> Path: return ROOT/"exercises"/f"{chapter}.ipynb"


def functions_of(path: Path, names: list[str]) -> dict:
    "The exercise functions of a notebook, defined by running its first code cell (imports) and the cells that hold them."
    ns, cells = {}, [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    exec(cells[0].source, ns)
    for cell in cells:
        if any(f"def {name}(" in cell.source for name in names): exec(cell.source, ns)
    return {name: ns[name] for name in names}


# ---- what every checker must do ----

def assert_passes_and_keeps_the_random_state(check, fn) -> None:
    "`check` passes `fn` (the reference solution) and leaves torch's and NumPy's global random states as they were."
    state, np_state = torch.get_rng_state(), np.random.get_state()
    result = check(fn, show=False)
    assert result.passed, result
    assert torch.equal(torch.get_rng_state(), state), "a check must not change the learner's global random state"
    after = np.random.get_state()
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:], "NumPy's global random state changed"


def assert_not_attempted(check, stub, name: str) -> None:
    "`check` reports the student stub (which raises NotImplementedError) as not attempted, by its name."
    result = check(stub, show=False)
    assert result.status == ex.NOT_ATTEMPTED and not result.passed, result
    assert "not attempted" in result.message and f"`{name}`" in result.message


def assert_catches(check, name: str, wrong: list) -> None:
    "Each of `wrong`'s (function, 'hint' or 'message', words) fails, with the words in that field and no expected values shown."
    assert len(wrong) >= 2
    for fn, field, words in wrong:
        result = check(fn, show=False)
        assert result.status == ex.FAILED, (name, words, result)
        assert words in getattr(result, field), (name, words, str(result))
        assert "tensor(" not in result.message + result.hint  # says how far off, never prints the expected values


def assert_survives_crashes_and_wrong_types(check) -> None:
    "`check` fails, with a message, a function that crashes, one that returns the wrong kind of thing, and a non-function."
    def crashes(*args, **kwargs): raise ValueError("oops, index 7")
    result = check(crashes, show=False)
    assert result.status == ex.FAILED and "ValueError" in result.message and "oops, index 7" in result.message
    for returns in ([1.0, 2.0], None, "text", torch.zeros(2, 3, 4), (torch.zeros(2), torch.zeros(2))):
        result = check(lambda *a, r=returns, **k: r, show=False)
        assert result.status == ex.FAILED and result.message, (returns, result)
    assert check(42, show=False).status == ex.FAILED  # not a function


# ---- the notebooks ----

def assert_student_notebook(chapter: str, solution_lines: tuple[str, ...], n_exercises: int) -> None:
    "The student notebook has a stub per exercise, none of the solution's `solution_lines`, no markers and no outputs."
    text, solution = student_notebook(chapter).read_text(encoding="utf-8"), solution_notebook(chapter).read_text(encoding="utf-8")
    assert ex.BEGIN_SOLUTION not in text and ex.END_SOLUTION not in text
    for line in solution_lines:
        assert line in solution and line not in text, line
    nb = nbformat.read(student_notebook(chapter), as_version=4)
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert sum("raise NotImplementedError(" in c.source for c in nb.cells if c.cell_type == "code") == n_exercises


def assert_unchanged_by_nbdev_clean(*paths: Path) -> None:
    "CI runs `nbdev-clean` before checking that generated files are up to date: these notebooks must already be clean."
    import tomllib
    from fastcore.nbio import nb2str
    from nbdev.clean import clean_nb
    cfg = tomllib.loads((ROOT/"pyproject.toml").read_text(encoding="utf-8"))["tool"]["nbdev"]  # what nbdev-clean reads
    for path in paths:
        text = path.read_text(encoding="utf-8")
        nb = json.loads(text)
        clean_nb(nb, allowed_metadata_keys=cfg.get("allowed_metadata_keys"), allowed_cell_metadata_keys=cfg.get("allowed_cell_metadata_keys"))
        assert nb2str(nb) == text, path


# ---- grading ----

@contextlib.contextmanager
def passive_openmp_waits():
    """Kernels started inside inherit OMP_WAIT_POLICY=PASSIVE: OpenMP threads that wait passively instead of spinning
    keep small tensor operations fast when the cores are shared (otherwise each can take milliseconds); scores do not
    depend on it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        yield


def grade(paths: list[Path], json_path: Path, timeout: float) -> tuple[int, list[dict]]:
    "One in-process `ptm-course grade` run over `paths`: its exit code and its JSON results, one per notebook."
    rc = ex.grade_cli([str(p) for p in paths], json_path=str(json_path), timeout=timeout)
    return rc, json.loads(Path(json_path).read_text(encoding="utf-8"))


def assert_graded(result: dict, names: list[str], status: str) -> None:
    "A notebook graded without problems, its exercises in order and all with `status`: score 1 if passed, else 0."
    assert result["score"] == (1.0 if status == ex.PASSED else 0.0) and result["error"] is None and result["problems"] == [], result
    assert [e["name"] for e in result["exercises"]] == names
    assert all(e["status"] == status for e in result["exercises"]), result


# ---- the tests every one-chapter exercise module runs on its notebooks ----

def notebook_tests(chapter: str, names: list[str], solution_lines: tuple[str, ...], checks_notebook: str, timeout: float) -> dict:
    """The student notebook is up to date, has stubs and none of `solution_lines`, both notebooks (and the checkers'
    notebook `checks_notebook` in nbs/) are nbdev-clean, and one `grade` run scores the solution 1 and the student 0.
    A test module takes these with `globals().update(notebook_tests(...))`."""
    solution, student = solution_notebook(chapter), student_notebook(chapter)

    def test_student_notebook_is_up_to_date():
        wanted = ex.student_notebooks(ROOT)[student.resolve()]
        assert student.exists() and student.read_text(encoding="utf-8") == wanted, f"stale {student}: run `ptm-course exercises` and commit it"

    def test_student_notebook_has_stubs_and_no_solutions_or_outputs():
        assert_student_notebook(chapter, solution_lines, len(names))

    def test_notebooks_are_unchanged_by_nbdev_clean():
        assert_unchanged_by_nbdev_clean(student, solution, ROOT/"nbs"/f"{checks_notebook}.ipynb")

    @pytest.fixture(scope="module")
    def graded(tmp_path_factory):
        "One `grade` run over the solution and the student notebook: two kernels, one after the other."
        with passive_openmp_waits():
            rc, (solved, stub) = grade([solution, student], tmp_path_factory.mktemp("grade")/f"{chapter}.json", timeout)
        return dict(rc=rc, solution=solved, student=stub)

    def test_grade_scores_the_solution_one(graded):
        assert graded["rc"] == 0
        assert_graded(graded["solution"], names, ex.PASSED)

    def test_grade_scores_the_student_notebook_zero(graded):
        assert_graded(graded["student"], names, ex.NOT_ATTEMPTED)

    return {"graded": graded, **{f.__name__: f for f in (
        test_student_notebook_is_up_to_date, test_student_notebook_has_stubs_and_no_solutions_or_outputs,
        test_notebooks_are_unchanged_by_nbdev_clean, test_grade_scores_the_solution_one, test_grade_scores_the_student_notebook_zero)}}


def checker_tests(names: list[str], checkers: dict, reference: dict, stubs: dict, wrong: dict, notebooks: dict[Path, list[str]]) -> dict:
    """The notebooks in `notebooks` hold exactly their exercises, in order; per exercise, the checker passes the reference
    solution without touching the global random state, reports the student stub as not attempted, catches the typical
    wrong answers in `wrong` with the right hint, and survives crashes and wrong types. A test module takes these with
    `globals().update(checker_tests(...))`."""
    def test_the_notebooks_have_their_exercises():
        for path, in_it in notebooks.items():
            assert ex.find_exercises(nbformat.read(path, as_version=4)) == in_it, path

    @pytest.mark.parametrize("name", names)
    def test_checker_passes_the_reference_solution_and_leaves_the_random_state_alone(name):
        assert_passes_and_keeps_the_random_state(checkers[name], reference[name])

    @pytest.mark.parametrize("name", names)
    def test_checker_reports_the_stub_as_not_attempted(name):
        assert_not_attempted(checkers[name], stubs[name], name)

    @pytest.mark.parametrize("name", names)
    def test_checker_catches_typical_mistakes(name):
        assert_catches(checkers[name], name, wrong[name])

    @pytest.mark.parametrize("name", names)
    def test_checker_survives_crashes_and_wrong_types(name):
        assert_survives_crashes_and_wrong_types(checkers[name])

    return {f.__name__: f for f in (test_the_notebooks_have_their_exercises, test_checker_passes_the_reference_solution_and_leaves_the_random_state_alone,
                                    test_checker_reports_the_stub_as_not_attempted, test_checker_catches_typical_mistakes,
                                    test_checker_survives_crashes_and_wrong_types)}
