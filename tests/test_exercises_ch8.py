"""The exercises of chapter 8 (deployment): their checkers and notebooks.

Every checker must pass the reference solution (taken from the solution notebook itself), report
the student stub as not attempted, survive crashes and wrong types, leave the learner's random
state alone, and fail typical wrong answers with the right hint. The wrong answers are written
out here, independently of the mistake models inside the checkers. The oracles are checked too:
the ONNX files the checker writes by hand against torch.onnx.export's, the simulated clock (put
back after every check, a crash included, and never seen by other threads), and the request rules
against statuses written out here. One module-scoped `grade` run scores the solution notebook 1.0
and the student notebook 0.0."""
import json
import statistics
import threading
import time
import timeit
from time import perf_counter as imported_perf_counter  # a learner's `from time import perf_counter`

import nbformat
import numpy as np
import onnxruntime as ort
import pytest
import torch

from exercise_helpers import (
    checker_tests, functions_of, notebook_tests, solution_notebook, student_notebook)
from ptm_course import exercises as ex
from ptm_course.checks import deploy

CHAPTER = "08_deployment"
NAMES = ["verify_export", "measure_latency", "validate_review_request"]
SOLUTION, STUDENT = solution_notebook(CHAPTER), student_notebook(CHAPTER)
CHECKERS = {name: getattr(deploy, f"check_{name}") for name in NAMES}
TIMEOUT = 120  # seconds per cell when grading: generous, since torch.onnx.export takes seconds on a busy machine

REFERENCE, STUBS = functions_of(SOLUTION, NAMES), functions_of(STUDENT, NAMES)


# ---- typical wrong answers, per exercise: (function, "hint" or "message", words it must contain) ----

def _verify(model, onnx_path, inputs, atol=1e-4, eval_mode=True, no_grad=True, run_model=True, feed=lambda x: x.numpy(),
            input_name=None, output_names=None, measure="max", error=ValueError, limit=None):
    if eval_mode: model.eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(output_names, {input_name or session.get_inputs()[0].name: feed(inputs)})[0]
    if not run_model: expected = got.copy()  # compares the file with itself
    elif no_grad:
        with torch.no_grad(): expected = model(inputs).numpy()
    else: expected = model(inputs).numpy()   # the output requires grad: .numpy() refuses
    d = got.astype(np.float64) - expected
    diff = {"max": np.abs(d).max(), "mean": np.abs(d).mean(), "sum": np.abs(d).sum(), "rms": np.sqrt((d**2).mean()),
            "relative": (np.abs(d) / np.abs(expected)).max(), "signed": d.max(), "signed, other way": (-d).max(),
            "classes": float((got.argmax(1) != expected.argmax(1)).sum())}[measure]
    if error is AssertionError: assert diff <= (limit or atol), f"differ by {diff}"
    elif error is not None and diff > (limit or atol): raise error(f"ONNX Runtime and PyTorch differ by up to {diff:.2e}")
    return float(diff)

def _latency(fn, runs=100, warmup=10, sync=None, clock="perf_counter", calls=None, time_warmup=False, sync_when="before the clock",
             sync_after_warmup=True, whole_loop=False, scale=1000, summary="percentiles"):
    read = lambda: getattr(time, clock)()  # looked up at call time, as `time.perf_counter()` in a learner's cell is
    wait = (lambda: None) if sync is None else sync
    if sync_when == "always": wait = lambda: sync()  # sync is None on a CPU: TypeError
    for _ in range(warmup if not time_warmup else 0): fn()
    if sync_after_warmup: wait()
    times, n = [], (runs + (warmup if time_warmup else 0)) if calls is None else calls
    start = read()
    for _ in range(n):
        if not whole_loop: start = read()
        fn()
        if sync_when in ("before the clock", "always"): wait()
        if not whole_loop: times.append((read() - start) * scale)
        if sync_when == "after the clock": wait()
    if whole_loop: times = [(read() - start) * scale / n] * n
    t = np.array(times)
    p = {"percentiles": np.percentile(t, [50, 90, 99]), "fractions": np.percentile(t, [0.5, 0.9, 0.99]),
         "mean as p50": [t.mean(), *np.percentile(t, [90, 99])],
         "rank": [np.sort(t)[min(int(q * len(t)), len(t) - 1)] for q in (0.5, 0.9, 0.99)]}[summary]
    return {"p50": p[0], "p90": p[1], "p99": p[2]}

def _validate(content_type, body, max_bytes=65536, max_chars=2000, media="split", check_type=True, no_header="415", size="first",
              size_of="bytes", size_cmp=">", decode="utf-8", catch=(UnicodeDecodeError, json.JSONDecodeError), objects_only=True,
              get="get", text_types=True, strip=True, chars_of="chars", chars_cmp=">", bad_text=422, everything=None, message="words",
              stripped=False, order="status first"):
    def answer(status, words):
        status = everything if everything and status != 200 else status
        text = {"words": words, "empty": "", "vague": "bad request"}[message] if status != 200 else words
        return (text, status) if order == "message first" else (status, text)
    if content_type is None and no_header == "crash": content_type.lower()
    media_type = {"split": (content_type or "").split(";")[0].strip().lower(), "whole": (content_type or "").lower(),
                  "case": (content_type or "").split(";")[0].strip()}.get(media)
    ok = (content_type or "").lower().startswith("application/json") if media == "startswith" else media_type == "application/json"
    if check_type and not ok: return answer(415, "send application/json")
    if size == "first" and (len(body) if size_of == "bytes" else len(body.decode("utf-8", "replace"))) > max_bytes - (size_cmp == ">="):
        return answer(413, f"the body is larger than {max_bytes} bytes")
    try: data = json.loads(body.decode("utf-8")) if decode == "utf-8" else json.loads(body)
    except catch as e: return answer(400, "the body is not UTF-8" if isinstance(e, UnicodeDecodeError) else "the body is not JSON")
    if size == "after parsing" and len(body) > max_bytes: return answer(413, f"the body is larger than {max_bytes} bytes")
    if objects_only and not isinstance(data, dict): return answer(400, "send a JSON object")
    text = data.get("text") if get == "get" else data["text"]
    if text_types and not isinstance(text, str): return answer(bad_text, "text must be a string")
    if not (text.strip() if strip else text): return answer(bad_text, "text is empty")
    if (len(text) if chars_of == "chars" else len(text.encode())) > max_chars - (chars_cmp == ">="):
        return answer(bad_text, f"text is longer than {max_chars} characters")
    return answer(200, text.strip() if stripped else text)

def _validate_size_first(content_type, body, max_bytes=65536, max_chars=2000):
    "The size checked before the content type: 413 for a body that is too large, whatever its type."
    if len(body) > max_bytes: return 413, f"the body is larger than {max_bytes} bytes"
    return _validate(content_type, body, max_bytes, max_chars)

WRONG = {
    "verify_export": [
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, eval_mode=False), "hint", "model.eval()"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, run_model=False), "message", "never ran the PyTorch model"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, measure="classes"), "hint", "not the predicted classes"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, measure="mean"), "hint", "not the mean"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, measure="sum"), "hint", "not the sum"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, measure="rms"), "hint", "root mean square"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, measure="relative"), "hint", "not a relative one"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, measure="signed"), "hint", "one sign"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, measure="signed, other way"), "hint", "one sign"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, error=AssertionError), "hint", "assert statements"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, error=None), "message", "but raised nothing"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, limit=1e-4), "hint", "the atol argument"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, feed=lambda t: t), "hint", "not torch tensors"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, input_name="input"), "hint", "session.get_inputs()[0].name"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, output_names=["output"]), "hint", "pass None"),
        (lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, no_grad=False), "hint", "torch.no_grad()"),
    ],
    "measure_latency": [
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, 0, sync), "hint", "warmup times first"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, calls=runs + 1), "message", "expected warmup + runs"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, time_warmup=True), "hint", "warm-up calls must not be timed"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, sync_when="never", sync_after_warmup=False), "message", "never called"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, sync_when="after the clock"), "hint", "stop the clock after sync()"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, sync_after_warmup=False), "hint", "after the warm-up calls too"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, sync_when="always"), "hint", "if sync is not None"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, clock="time"), "message", "never read time.perf_counter()"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, whole_loop=True), "hint", "time each call on its own"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, scale=1), "hint", "multiply the seconds"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, scale=1e6), "hint", "not by 1e6"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, summary="mean as p50"), "hint", "not the mean"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, summary="fractions"), "hint", "percents"),
        (lambda fn, runs=100, warmup=10, sync=None: _latency(fn, runs, warmup, sync, summary="rank"), "hint", "linear interpolation"),
        (lambda fn, runs=100, warmup=10, sync=None: list(_latency(fn, runs, warmup, sync).values()), "message", "expected a dict"),
    ],
    "validate_review_request": [
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, everything=400), "hint", "its own status"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, media="startswith"), "hint", "exactly"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, check_type=False), "hint", "accept application/json only"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, media="whole"), "hint", "parameters after ';'"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, media="case"), "hint", "case-insensitive"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, no_header="crash"), "hint", "no Content-Type header"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, size_cmp=">="), "hint", "exactly max_bytes"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, size="after parsing"), "hint", "before parsing"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, size_of="chars"), "hint", "the bytes received"),
        (_validate_size_first, "hint", "the content type first"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, catch=json.JSONDecodeError), "hint", "UnicodeDecodeError"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, decode="json.loads", catch=ValueError), "hint", "UTF-16"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, objects_only=False), "hint", "isinstance(data, dict)"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, get="index"), "hint", "data.get('text')"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, text_types=False), "hint", "isinstance(text, str)"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, strip=False), "hint", "text.strip()"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, chars_of="bytes"), "hint", "not bytes"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, chars_cmp=">="), "hint", "exactly max_chars"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, bad_text=400), "hint", "not 400"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, stripped=True), "hint", "unchanged"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, message="vague"), "message", "does not mention"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, message="empty"), "message", "the message is empty"),
        (lambda c, b, max_bytes=65536, max_chars=2000: _validate(c, b, max_bytes, max_chars, order="message first"), "hint", "the status comes first"),
    ],
}


globals().update(checker_tests(NAMES, CHECKERS, REFERENCE, STUBS, WRONG, {SOLUTION: NAMES, STUDENT: NAMES}))


def test_verify_export_accepts_what_is_not_a_mistake():
    "A float32 NumPy number, a comparison in float64, the training mode put back afterwards, ONNX Runtime's default session."
    def careful(model, onnx_path, inputs, atol=1e-4):
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(): expected = model(inputs).double().numpy()
        finally: model.train(was_training)
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
        diff = np.max(np.abs(got.astype(np.float64) - expected))
        if diff > atol: raise ValueError(f"{diff} > {atol}")
        return np.float32(diff)
    assert deploy.check_verify_export(careful, show=False).passed


def test_a_float64_feed_gets_its_own_hint():
    "ONNX Runtime's message names the dtypes as 'tensor(double)': that is the learner's error quoted, not an expected value shown."
    result = deploy.check_verify_export(lambda m, p, x, atol=1e-4: _verify(m, p, x, atol, feed=lambda t: t.numpy().astype(np.float64)), show=False)
    assert result.status == ex.FAILED and "Unexpected input data type" in result.message and "float32" in result.hint


def test_measure_latency_accepts_what_is_not_a_mistake():
    "perf_counter_ns, `from time import perf_counter`, timeit.default_timer, statistics.median, sync before the clock starts, more keys."
    def with_clock(read, scale):
        def measure_latency(fn, runs=100, warmup=10, sync=None):
            for _ in range(warmup): fn()
            times = []
            for _ in range(runs):
                if sync: sync()
                start = read()
                fn()
                if sync: sync()
                times.append((read() - start) * scale)
            return {"p50": statistics.median(times), "p90": float(np.percentile(times, 90)), "p99": float(np.percentile(times, 99)),
                    "mean": statistics.mean(times)}
        return measure_latency
    for read, scale in ((lambda: time.perf_counter_ns(), 1e-6), (lambda: imported_perf_counter(), 1e3), (lambda: timeit.default_timer(), 1e3)):
        assert deploy.check_measure_latency(with_clock(read, scale), show=False).passed


def test_validate_review_request_accepts_what_is_not_a_mistake():
    "HTTPStatus members, a list instead of a tuple, messages in other words."
    from http import HTTPStatus
    def enum_status(content_type, body, max_bytes=65536, max_chars=2000):
        status, message = REFERENCE["validate_review_request"](content_type, body, max_bytes, max_chars)
        return [HTTPStatus(status), message if status == 200 else f"Refused ({message.upper()})"]
    assert deploy.check_validate_review_request(enum_status, show=False).passed


# ---- the oracles ----

def test_the_hand_written_onnx_files_compute_what_torch_onnx_export_writes(tmp_path):
    "The checker writes its ONNX files itself (milliseconds); torch.onnx.export's files (seconds) give the same outputs."
    gen = torch.Generator().manual_seed(5)
    for model, features, name in ((deploy._dropout_classifier(3), 8, "features"), (deploy._batchnorm_regressor(4), 6, "x")):
        model.eval()
        x = torch.randn(9, features, generator=gen)
        ours = deploy._export_by_hand(model, tmp_path/f"{name}_ours.onnx", name, "out")
        theirs = tmp_path/f"{name}_torch.onnx"
        torch.onnx.export(model, (torch.randn(4, features, generator=gen),), str(theirs), input_names=[name], output_names=["out"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
        a, b = deploy._onnx_runtime(ours, x), deploy._onnx_runtime(theirs, x)
        assert a.shape == b.shape == (9, model[-1].out_features) and np.abs(a - b).max() < 1e-5, name
        with torch.no_grad(): assert np.abs(a - model(x).numpy()).max() < 1e-5, name


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_export_cases_are_what_the_checker_says(seed, tmp_path):
    "Right exports agree to float32 rounding; the wrong ones are off by one sign each, case 3 with the same predicted classes."
    right1, right2, wrong3, wrong4 = deploy._export_cases(tmp_path, seed)
    assert right1["right"] and right2["right"] and not wrong3["right"] and not wrong4["right"]
    assert right1["diff"] < 1e-6 and right2["diff"] < 1e-6
    assert 1e-3 < wrong3["diff"] <= 0.02 + 1e-6 and abs(wrong4["diff"] - 0.03) < 1e-6
    assert (wrong3["ort"] - wrong3["eager"]).min() > -1e-6 and (wrong4["ort"] - wrong4["eager"]).max() < 1e-6  # one sign each
    assert wrong3["same_classes"]
    assert {c["path"].name for c in (right1, right2, wrong3, wrong4)} == {"model1.onnx", "model2.onnx", "model3.onnx", "model4.onnx"}


def test_the_simulated_clock_is_put_back_and_other_threads_keep_the_real_one():
    real = time.perf_counter
    def crashes_mid_measurement(fn, runs=100, warmup=10, sync=None):
        time.perf_counter()
        raise RuntimeError("boom")
    assert "boom" in deploy.check_measure_latency(crashes_mid_measurement, show=False).message
    assert time.perf_counter is real and timeit.default_timer is real and imported_perf_counter is real
    assert globals()["imported_perf_counter"] is real
    seen = {}
    def other_thread(): seen["other"] = time.perf_counter()
    clock = deploy._SimulatedClock([1.0], [0.0])
    with deploy._simulated_time(clock, other_thread):
        thread = threading.Thread(target=other_thread)
        thread.start(); thread.join()
        assert time.perf_counter() == 1000.0 and clock.log == [("read", False)]
    assert seen["other"] != 1000.0 and time.perf_counter is real


def test_the_request_rules_give_the_statuses_written_out_here():
    want = [200] * 8 + [415] * 4 + [413] * 3 + [415] + [400] * 7 + [422] * 7
    got = [deploy._review_contract(content_type, body, **kwargs)[0] for _, content_type, body, kwargs, _ in deploy._REQUEST_CASES]
    assert got == want
    assert deploy._review_contract("application/json", json.dumps({"text": "  Loved it.\n"}).encode()) == (200, "  Loved it.\n")


def test_the_solutions_do_not_call_the_oracles():
    "The reference solutions use ONNX Runtime, PyTorch, time and json directly: none calls what the checks compare with."
    solutions = [c.source for c in nbformat.read(SOLUTION, as_version=4).cells if ex.BEGIN_SOLUTION in c.source]
    assert len(solutions) == len(NAMES)
    for oracle in ("_review_contract", "_SimulatedClock", "_export_by_hand", "_onnx_runtime", "ptm_course"):
        assert not any(oracle in s for s in solutions), oracle


# ---- the notebooks, and one grading run ----

globals().update(notebook_tests(CHAPTER, NAMES, ("name = session.get_inputs()[0].name", "times.append((time.perf_counter() - start) * 1000)",
                                      "if not isinstance(data, dict):"), "96_checks_deploy", TIMEOUT))
