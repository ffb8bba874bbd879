"""The exercises of chapter 10 (can you trust a pretrained model?): their checkers and notebooks.

Every checker must pass the reference solution (taken from the solution notebook itself), report
the student stub as not attempted, survive crashes and wrong types, leave the learner's random
state alone, and fail typical wrong answers with the right hint. The wrong answers are written
out here, independently of the mistake models inside the checkers. The oracles are checked too:
Captum's midpoint rule against the completeness property and the library's by-hand sum, the ECE
loop against the library's vectorized ECE and scikit-learn's bin accuracies. One module-scoped
`grade` run scores the solution notebook 1.0 and the student notebook 0.0."""
import math

import nbformat
import numpy as np
import pytest
import torch

from exercise_helpers import (
    checker_tests, functions_of, notebook_tests, solution_notebook, student_notebook)
from ptm_course import exercises as ex
from ptm_course import trust as lib
from ptm_course.checks import trust

CHAPTER = "10_trust"
NAMES = ["integrated_gradients", "expected_calibration_error", "directional_failure_rate"]
SOLUTION, STUDENT = solution_notebook(CHAPTER), student_notebook(CHAPTER)
CHECKERS = {name: getattr(trust, f"check_{name}") for name in NAMES}
TIMEOUT = 120  # seconds per cell when grading: generous on a busy machine

REFERENCE, STUBS = functions_of(SOLUTION, NAMES), functions_of(STUDENT, NAMES)


# ---- typical wrong answers, per exercise: (function, "hint" or "message", words it must contain) ----

def _ig(model, x, baseline, target, steps=32, offset=0.5, times_delta=True, average=True, from_zero=False, at_input=False):
    start = torch.zeros_like(x) if from_zero else baseline
    total = torch.zeros_like(x)
    for k in range(steps):
        point = (x if at_input else start + (k + offset) / steps * (x - start)).detach().requires_grad_(True)
        total += torch.autograd.grad(model(point)[:, target].sum(), point)[0]
    if average: total = total / steps
    return (x - start) * total if times_delta else total


def _ece(probs, labels, n_bins=10, weighted=True, signed=False, true_class=False, percent=False, one_bin=False):
    conf, pred = probs.max(1)
    if true_class: conf = probs.gather(1, labels[:, None]).squeeze(1)
    if one_bin: return abs((pred == labels).double().mean().item() - conf.mean().item())
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    gaps, weights = [], []
    for b in range(n_bins):
        m = bins == b
        if m.any():
            gap = (pred[m] == labels[m]).double().mean().item() - conf[m].mean().item()
            gaps.append(gap if signed else abs(gap)); weights.append(m.double().mean().item())
    w = weights if weighted else [1 / len(gaps)] * len(gaps)
    out = sum(a * b for a, b in zip(w, gaps))
    return 100 * out if percent else out


def _dir(predict_fresh, pairs, tolerance=0.1, how="right"):
    p0 = list(predict_fresh([a for a, _ in pairs])); p1 = list(predict_fresh([b for _, b in pairs]))
    if how == "reversed": fails = [a > b + tolerance for a, b in zip(p0, p1)]
    elif how == "abs": fails = [abs(b - a) > tolerance for a, b in zip(p0, p1)]
    elif how == "no tolerance": fails = [b > a for a, b in zip(p0, p1)]
    else: fails = [b > a + tolerance for a, b in zip(p0, p1)]
    if how == "count": return sum(fails)
    if how == "passes": return 1 - sum(fails) / len(pairs)
    return sum(fails) / len(pairs)


WRONG = {
    "integrated_gradients": [
        (lambda m, x, b, t, s=32: _ig(m, x, b, t, s, offset=0.0), "hint", "left Riemann"),
        (lambda m, x, b, t, s=32: _ig(m, x, b, t, s, offset=1.0), "hint", "right Riemann"),
        (lambda m, x, b, t, s=32: _ig(m, x, b, t, s, times_delta=False), "hint", "multiply it by (x - baseline)"),
        (lambda m, x, b, t, s=32: _ig(m, x, b, t, s, average=False), "hint", "divide by the number of steps"),
        (lambda m, x, b, t, s=32: _ig(m, x, b, t, s, at_input=True), "hint", "gradient times input"),
        (lambda m, x, b, t, s=32: _ig(m, x, b, t, s, from_zero=True), "hint", "measured from 0"),
    ],
    "expected_calibration_error": [
        (lambda p, y, n=10: _ece(p, y, n, weighted=False), "hint", "share of the examples"),
        (lambda p, y, n=10: _ece(p, y, n, signed=True), "hint", "signed"),
        (lambda p, y, n=10: _ece(p, y, n, true_class=True), "hint", "predicted class"),
        (lambda p, y, n=10: _ece(p, y, n, one_bin=True), "hint", "one bin"),
        (lambda p, y, n=10: _ece(p, y, n, percent=True), "hint", "percentage"),
    ],
    "directional_failure_rate": [
        (lambda f, pairs, tolerance=0.1: _dir(f, pairs, tolerance, "reversed"), "hint", "UP"),
        (lambda f, pairs, tolerance=0.1: _dir(f, pairs, tolerance, "abs"), "hint", "only an increase fails"),
        (lambda f, pairs, tolerance=0.1: _dir(f, pairs, tolerance, "no tolerance"), "hint", "tolerance is ignored"),
        (lambda f, pairs, tolerance=0.1: _dir(f, pairs, tolerance, "count"), "hint", "not the number"),
        (lambda f, pairs, tolerance=0.1: _dir(f, pairs, tolerance, "passes"), "hint", "not of passes"),
    ],
}


globals().update(checker_tests(NAMES, CHECKERS, REFERENCE, STUBS, WRONG, {SOLUTION: NAMES, STUDENT: NAMES}))


def test_captum_oracle_is_complete_and_matches_the_library():
    for what, model, x, baseline, target, steps in trust._ig_cases(3):
        captum = trust._captum_ig(model, x, baseline, target, steps)
        assert torch.allclose(captum, lib.integrated_gradients(model, x, target, baseline, steps), rtol=1e-6, atol=1e-9), what
        gap = (model(x)[:, target] - model(baseline)[:, target]).detach()
        fine = trust._captum_ig(model, x, baseline, target, 512)
        assert ((fine.flatten(1).sum(1) - gap).abs() <= 1e-3 * gap.abs().max()).all(), what


def test_ece_oracle_matches_the_library_and_sklearn():
    from sklearn.calibration import calibration_curve
    for what, probs, labels, n_bins in trust._ece_cases(5):
        assert trust._ece_loop(probs, labels, n_bins) == pytest.approx(lib.expected_calibration_error(probs, labels, n_bins), abs=1e-6)  # the library works in float32, what
        conf, pred = probs.max(1)
        acc, _ = calibration_curve((pred == labels).numpy(), conf.numpy(), n_bins=n_bins, strategy="uniform")
        bins = lib.reliability_bins(probs, labels, n_bins)
        assert np.allclose(acc, bins["accuracy"][bins["count"] > 0].numpy()), what


def test_directional_cases_tell_the_mistakes_apart():
    "Over the checker's cases, every typical mistake written here gives another list of answers than the right one and than each other."
    f = lambda texts: [trust._fake_classifier(t) for t in texts]
    answers = {how: tuple(round(_dir(f, pairs, tolerance, how), 9) for _, pairs, tolerance in trust._dir_cases())
               for how in ("right", "reversed", "abs", "no tolerance", "count", "passes")}
    assert len(set(answers.values())) == len(answers), answers


def test_the_solutions_do_not_call_the_oracles():
    solutions = [c.source for c in nbformat.read(SOLUTION, as_version=4).cells if ex.BEGIN_SOLUTION in c.source]
    assert len(solutions) == len(NAMES)
    for oracle in ("captum", "sklearn", "ptm_course.trust", "calibration_curve"):
        assert not any(oracle in s for s in solutions), oracle


globals().update(notebook_tests(CHAPTER, NAMES, ("point = (baseline + (k + 0.5) / steps * (x - baseline)).detach().requires_grad_(True)",
                                      "bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)",
                                      "failures = sum(after > before + tolerance for before, after in zip(p_original, p_perturbed))"),
                                "97_checks_trust", TIMEOUT))
