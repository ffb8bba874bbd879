"""The gradebook `ptm-course grade --csv/--canvas` writes: one row per student, the id read from the
file name by `--id-pattern` (default: Canvas download names), points and status per exercise, the
error column filled, and a Canvas import whose header is exactly what Canvas exports. Built from
grades made here, so no notebook runs; test_grader_attacks.py writes one from a graded class."""
import csv

import pytest

from ptm_course import exercises as ex

NAMES = ["mse_gradient", "adam_step", "warmup_cosine_lr"]


def _grade(path, statuses, reference="01_gradient_descent", error=None):
    g = ex.NotebookGrade(path, reference=reference, error=error)
    g.exercises = [ex.ExerciseGrade(n, s == "passed", s, f"{n} {s}") for n, s in zip(NAMES, statuses)]
    return g


def class_of_five(folder):
    "Five mixed submissions, named as a Canvas download names them (one late, one not a notebook)."
    return [
        _grade(f"{folder}/doefrank_12345_67890_01_gradient_descent.ipynb", ["passed"] * 3),
        _grade(f"{folder}/roejane_LATE_23456_67891_01_gradient_descent.ipynb", ["passed", "failed", "not attempted"]),
        _grade(f"{folder}/smithkim_34567_67892_01_gradient_descent.ipynb", ["passed", "timeout", "error"]),
        _grade(f"{folder}/leeal_45678_67893_01_gradient_descent.ipynb", ["not attempted"] * 3),
        ex.NotebookGrade(f"{folder}/parkjo_56789_67894_01_gradient_descent.ipynb", error="not a notebook: invalid JSON"),
    ]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f: return list(csv.reader(f))


def test_csv_has_a_row_per_student_with_points_status_and_errors(tmp_path):
    ex.write_csv(class_of_five("submissions"), tmp_path/"book.csv")
    header, *rows = _rows(tmp_path/"book.csv")
    assert header == ["student", "name", "points", "max_points", "error", *NAMES, *[f"{n} status" for n in NAMES]]
    by_id = {r[0]: dict(zip(header, r)) for r in rows}
    assert list(by_id) == ["12345", "23456", "34567", "45678", "56789"]
    assert by_id["12345"]["name"] == "doefrank" and by_id["12345"]["points"] == "3" and by_id["12345"]["error"] == ""
    assert [by_id["23456"][n] for n in NAMES] == ["1", "0", "0"] and by_id["23456"]["adam_step status"] == "failed"
    smith = by_id["34567"]
    assert (smith["points"], smith["max_points"]) == ("1", "3")
    assert "adam_step: timeout" in smith["error"] and "warmup_cosine_lr: error" in smith["error"]
    assert by_id["56789"]["points"] == "0" and "not a notebook" in by_id["56789"]["error"] and by_id["56789"]["mse_gradient"] == ""


def test_canvas_import_has_canvas_header_and_one_assignment_column(tmp_path):
    ex.write_canvas(class_of_five("submissions"), tmp_path/"canvas.csv", assignment="Exercises 1 (4321)")
    header, *rows = _rows(tmp_path/"canvas.csv")
    assert header == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", "Exercises 1 (4321)"]
    assert rows[0] == ["doefrank", "12345", "", "", "", "3"] and [r[5] for r in rows] == ["3", "1", "1", "0", "0"]
    ex.write_canvas(class_of_five("s"), tmp_path/"default.csv")
    assert _rows(tmp_path/"default.csv")[0][-1] == "01_gradient_descent"  # default: the reference's name


def test_id_pattern_reads_other_layouts_and_reports_what_does_not_match(tmp_path):
    grades = [_grade("submitted/alice/ps1/01_gradient_descent.ipynb", ["passed"] * 3),
              _grade("submitted/bob/ps1/01_gradient_descent.ipynb", ["failed"] * 3),
              _grade("elsewhere/carol.ipynb", ["passed"] * 3)]
    ex.write_csv(grades, tmp_path/"book.csv", id_pattern=r"submitted/(?P<id>[^/]+)/")
    header, *rows = _rows(tmp_path/"book.csv")
    assert [r[0] for r in rows] == ["alice", "bob", "elsewhere/carol"]
    assert "does not match --id-pattern" in dict(zip(header, rows[2]))["error"]
    # without a pattern that matches, each student is the path below the common folder: no two collide
    _, *rows = (ex.write_csv(grades[:2], tmp_path/"b2.csv"), *_rows(tmp_path/"b2.csv"))[1:]
    assert [r[0] for r in rows] == ["alice/ps1/01_gradient_descent", "bob/ps1/01_gradient_descent"]


def test_two_notebooks_of_one_student_share_a_row(tmp_path):
    grades = [_grade("doefrank_12345_1_a.ipynb", ["failed", "passed", "passed"]),
              _grade("doefrank_12345_2_a.ipynb", ["passed", "failed", "passed"])]
    ex.write_csv(grades, tmp_path/"book.csv")
    header, *rows = _rows(tmp_path/"book.csv")
    assert len(rows) == 1 and dict(zip(header, rows[0]))["points"] == "3" and "graded twice" in rows[0][4]


@pytest.mark.parametrize("pattern, words", [("(unclosed", "not a regular expression"), ("no-group", "(?P<id>")])
def test_a_bad_id_pattern_is_a_usage_error(tmp_path, capsys, pattern, words):
    nb = tmp_path/"x.ipynb"
    nb.write_text("{}")
    assert ex.grade_cli([str(nb)], id_pattern=pattern) == 2
    assert words in capsys.readouterr().err
