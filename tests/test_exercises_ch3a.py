"""The exercises of chapter 3a (saving and resuming training): their checkers and notebooks.

Every checker must pass the reference solution (taken from the solution notebook itself), report
the student stub as not attempted, survive crashes and wrong types, leave the learner's random
state alone, and fail typical wrong answers with the right hint. The wrong answers are written
out here, independently of the checkers. One module-scoped `grade` run scores the solution
notebook 1.0 and the student notebook 0.0."""
import copy

import torch

from exercise_helpers import checker_tests, functions_of, notebook_tests, solution_notebook, student_notebook
from ptm_course.checks import training

CHAPTER = "03a_training_loop"
NAMES = ["training_state", "restore_training_state"]
SOLUTION, STUDENT = solution_notebook(CHAPTER), student_notebook(CHAPTER)
CHECKERS = {name: getattr(training, f"check_{name}") for name in NAMES}
TIMEOUT = 60

REFERENCE, STUBS = functions_of(SOLUTION, NAMES), functions_of(STUDENT, NAMES)


# ---- typical wrong answers: (function, "hint" or "message", words it must contain) ----

def _state(model, optimizer, scheduler, generator, step, weights_only=False, no_scheduler=False, global_rng=False, references=False):
    if weights_only: return {"model": copy.deepcopy(model.state_dict()), "step": step}
    state = {"model": {k: v if references else v.clone() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict() if references else copy.deepcopy(optimizer.state_dict()),
             "generator": torch.random.get_rng_state() if global_rng else generator.get_state(), "step": step}
    if not no_scheduler: state["scheduler"] = copy.deepcopy(scheduler.state_dict())
    return state

def _restore(state, model, optimizer, scheduler, generator, skip=(), own_optimizer=False, step=None):
    model.load_state_dict(state["model"])
    if "optimizer" not in skip:
        target = torch.optim.AdamW(model.parameters()) if own_optimizer else optimizer
        target.load_state_dict(state["optimizer"])
    if "scheduler" not in skip: scheduler.load_state_dict(state["scheduler"])
    if "generator" not in skip: generator.set_state(state["generator"])
    return state["step"] if step is None else step

WRONG = {
    "training_state": [
        (lambda *a: _state(*a, weights_only=True), "hint", "moving averages"),
        (lambda *a: _state(*a, no_scheduler=True), "hint", "warm-up"),
        (lambda *a: _state(*a, global_rng=True), "hint", "next batches"),
        (lambda *a: _state(*a, references=True), "hint", "live tensors"),
    ],
    "restore_training_state": [
        (lambda s, *a: _restore(s, *a, skip=("optimizer",)), "message", "optimizer is not"),
        (lambda s, *a: _restore(s, *a, own_optimizer=True), "message", "optimizer is not"),
        (lambda s, *a: _restore(s, *a, skip=("scheduler",)), "message", "scheduler is not"),
        (lambda s, *a: _restore(s, *a, skip=("generator",)), "message", "generator is not"),
        (lambda s, *a: _restore(s, *a, step=0), "hint", 'state["step"]'),
    ],
}


def test_the_uninterrupted_run_is_reproducible_and_the_parts_matter():
    "The oracle's premise: two runs from the same seeds agree exactly, and resuming without the optimizer's state does not."
    a, b = training._objects(0, 1), training._objects(0, 1)
    assert training._train(*a, 8) == training._train(*b, 8)
    run = training._objects(0, 1)
    training._train(*run, 5)
    state = training._save(*run, 5)
    straight = training._train(*run, 4)
    fresh = training._objects(7, 8)
    training._restore(state, *fresh)
    assert training._train(*fresh, 4) == straight
    fresh = training._objects(7, 8)
    fresh[0].load_state_dict(state["model"]); fresh[2].load_state_dict(state["scheduler"]); fresh[3].set_state(state["generator"])
    assert training._train(*fresh, 4) != straight


globals().update(checker_tests(NAMES, CHECKERS, REFERENCE, STUBS, WRONG, {SOLUTION: NAMES, STUDENT: NAMES}))
globals().update(notebook_tests(CHAPTER, NAMES, ("return copy.deepcopy({", "generator.set_state(state"),
                                "97b_checks_training", TIMEOUT))
