"""The exercises of chapter 7 (compression): their checkers and notebooks.

Every checker must pass the reference solution (taken from the solution notebook itself), report
the student stub as not attempted, survive crashes and wrong types, leave the learner's random
state alone, and fail typical wrong answers with the right hint. The wrong answers are written
out here, independently of the mistake models inside the checkers. The oracles are checked
against each other (MinMaxObserver and the scale formula, PyTorch's two quantizers, prune's mask
and a sort, F.kl_div and the KL sum). One module-scoped `grade` run scores the solution notebook
1.0 and the student notebook 0.0."""
import warnings

import nbformat
import pytest
import torch
import torch.nn.functional as F

from exercise_helpers import (
    checker_tests, functions_of, notebook_tests, solution_notebook, student_notebook)
from ptm_course import exercises as ex
from ptm_course.checks import compress

CHAPTER = "07_compression"
NAMES = ["quantize", "dequantize", "magnitude_prune", "soft_targets_loss"]
SOLUTION, STUDENT = solution_notebook(CHAPTER), student_notebook(CHAPTER)
CHECKERS = {name: getattr(compress, f"check_{name}") for name in NAMES}
TIMEOUT = 120  # seconds per cell when grading: generous, since loading the bundled encoder is slow on a busy machine

REFERENCE, STUBS = functions_of(SOLUTION, NAMES), functions_of(STUDENT, NAMES)


# ---- typical wrong answers, per exercise: (function, "hint" or "message", words it must contain) ----

def _quantize(x, bits=8, with_zero=True, steps=None, rounding=torch.round, zero_point_rounded=True, signed=False,
              symmetric=False, from_min=False, add_zero_point=True, dtype=torch.uint8, scale_for_zeros=1.0):
    qmin, qmax = (-2**(bits - 1), 2**(bits - 1) - 1) if signed else (0, 2**bits - 1)
    lo, hi = (x.min().item(), x.max().item()) if not with_zero else (min(x.min().item(), 0.0), max(x.max().item(), 0.0))
    if symmetric: lo, hi = -x.abs().max().item(), x.abs().max().item()
    n = steps(bits) if steps else qmax - qmin
    scale = (hi - lo) / n if hi > lo or scale_for_zeros is None else scale_for_zeros  # None: divide by zero like the formula says
    zero_point = qmin - lo / scale
    if zero_point_rounded: zero_point = min(max(round(zero_point), qmin), qmax)
    if from_min: q = torch.round((x - lo) / scale)
    else: q = rounding(x / scale) + (zero_point if add_zero_point else 0)
    return q.clamp(qmin, qmax).to(dtype), scale, zero_point

def _dequantize(q, scale, zero_point, how="right"):
    if how == "add": return (q.float() + zero_point) * scale
    if how == "no cast": return (q - zero_point) * scale
    if how == "scale first": return q.float() * scale - zero_point
    if how == "divide": return (q.float() - zero_point) / scale
    if how == "integer": return (q.long() - zero_point) * round(scale)
    return (q.float() - zero_point) * scale

def _prune(weight, sparsity, rank="magnitude", count=round, keep_fraction=False, threshold=None, per_row=False,
           inverted=False, as_bool=False, return_weights=False):
    w = weight.detach()
    if per_row:
        rows = [_prune(r, sparsity, count=count) for r in w.reshape(w.shape[0], -1)]
        return torch.stack(rows).reshape(w.shape)
    score = {"magnitude": w.abs(), "largest": -w.abs(), "signed": w}[rank]
    n = w.numel()
    k = n - count(sparsity * n) if keep_fraction else count(sparsity * n)
    ordered = score.flatten().sort().values
    if threshold == "strict":    # everything at or below the k-th smallest goes: one too many
        mask = score > ordered[min(k, n - 1)]
    elif threshold == "inclusive":  # everything below the k-th smallest goes: one too few
        mask = score >= ordered[k - 1] if k > 0 else torch.ones_like(score, dtype=torch.bool)
    elif threshold == "kthvalue":  # kthvalue counts from 1: fails at sparsity 0
        mask = score > score.flatten().kthvalue(k).values
    else:
        mask = torch.ones(n, dtype=torch.bool)
        mask[score.flatten().argsort()[:k]] = False
        mask = mask.reshape(w.shape)
    if inverted: mask = ~mask
    if as_bool: return mask
    return w * mask if return_weights else mask.float()

def _soft(s, t, T, power=2, reverse=False, reduction="batchmean", teacher_T=True, detach=True, log_target=True, item=False):
    t = t.detach() if detach else t
    log_ps, log_pt = F.log_softmax(s / T, -1), F.log_softmax(t / (T if teacher_T else 1.0), -1)
    if reverse: log_ps, log_pt = log_pt, log_ps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kl = F.kl_div(log_ps, log_pt, reduction=reduction, log_target=log_target)  # log-probabilities as target: NaN unless log_target
    loss = T**power * kl
    return loss.item() if item else loss

WRONG = {
    "quantize": [
        (lambda x, bits=8: _quantize(x, bits, with_zero=False), "hint", "include 0"),
        (lambda x, bits=8: _quantize(x, bits, rounding=torch.floor), "hint", "torch.round"),
        (lambda x, bits=8: _quantize(x, bits, zero_point_rounded=False), "hint", "round the zero point"),
        (lambda x, bits=8: _quantize(x, bits, signed=True, dtype=torch.int16), "hint", "unsigned"),
        (lambda x, bits=8: _quantize(x, bits, dtype=torch.float32), "message", "expected an integer dtype"),
        (lambda x, bits=8: _quantize(x, bits, steps=lambda b: 2**b), "hint", "2**bits - 1"),
        (lambda x, bits=8: _quantize(x, bits, symmetric=True), "hint", "symmetric"),
        (lambda x, bits=8: _quantize(x, bits, from_min=True), "hint", "round((x - min) / scale)"),
        (lambda x, bits=8: _quantize(x, bits, add_zero_point=False, dtype=torch.int64), "hint", "add the zero point"),
        (lambda x, bits=8: _quantize(x, bits, scale_for_zeros=None), "message", "tensor of zeros"),
        (lambda x, bits=8: _quantize(x, bits, dtype=torch.int8), "hint", "torch.uint8"),
    ],
    "dequantize": [
        (lambda q, scale, zero_point: _dequantize(q, scale, zero_point, "add"), "hint", "don't add it"),
        (lambda q, scale, zero_point: _dequantize(q, scale, zero_point, "no cast"), "hint", "wraps around"),
        (lambda q, scale, zero_point: _dequantize(q, scale, zero_point, "scale first"), "hint", "before multiplying"),
        (lambda q, scale, zero_point: _dequantize(q, scale, zero_point, "divide"), "hint", "don't divide"),
        (lambda q, scale, zero_point: _dequantize(q, scale, zero_point, "integer"), "message", "floating-point"),
    ],
    "magnitude_prune": [
        (lambda w, s: _prune(w, s, rank="largest"), "hint", "pruned the largest"),
        (lambda w, s: _prune(w, s, rank="signed"), "hint", "magnitude"),
        (lambda w, s: _prune(w, s, keep_fraction=True), "hint", "not the fraction kept"),
        (lambda w, s: _prune(w, s, count=int), "hint", "int() rounds down"),
        (lambda w, s: _prune(w, s, threshold="strict"), "hint", "one more"),
        (lambda w, s: _prune(w, s, threshold="inclusive"), "hint", "one fewer"),
        (lambda w, s: _prune(w, s, per_row=True), "hint", "whole tensor"),
        (lambda w, s: _prune(w, s, inverted=True), "hint", "other way round"),
        (lambda w, s: _prune(w, s, as_bool=True), "message", "boolean"),
        (lambda w, s: _prune(w, s, return_weights=True), "hint", "not the pruned weights"),
        (lambda w, s: _prune(w, s, threshold="kthvalue"), "hint", "kthvalue(0)"),
    ],
    "soft_targets_loss": [
        (lambda s, t, T: _soft(s, t, T, power=0), "hint", "T**2 is missing"),
        (lambda s, t, T: _soft(s, t, T, power=1), "hint", "not by T"),
        (lambda s, t, T: _soft(s, t, T, reverse=True), "hint", "wrong way round"),
        (lambda s, t, T: _soft(s, t, T, reduction="mean"), "hint", "batchmean"),
        (lambda s, t, T: _soft(s, t, T, teacher_T=False), "hint", "teacher's logits by the temperature"),
        (lambda s, t, T: _soft(s, t, T, detach=False), "message", "gradient into the teacher's logits"),
        (lambda s, t, T: _soft(s, t, T, log_target=False), "hint", "log_target=True"),
        (lambda s, t, T: _soft(s, t, T, item=True), "hint", ".item()"),
    ],
}


globals().update(checker_tests(NAMES, CHECKERS, REFERENCE, STUBS, WRONG, {SOLUTION: NAMES, STUDENT: NAMES}))


def test_quantize_accepts_what_is_not_a_mistake():
    "Tensors for the scale and zero point, int64 codes, another positive scale for a tensor of zeros, and no clamp (never needed here)."
    def tensors(x, bits=8):
        q, scale, zero_point = _quantize(x, bits, dtype=torch.int64)
        return q, torch.tensor(scale), torch.tensor(zero_point)
    assert compress.check_quantize(tensors, show=False).passed
    def observer_scale_for_zeros(x, bits=8):  # MinMaxObserver's choice: float32's epsilon
        return _quantize(x, bits, scale_for_zeros=torch.finfo(torch.float32).eps)
    assert compress.check_quantize(observer_scale_for_zeros, show=False).passed
    def no_clamp(x, bits=8):
        q, scale, zero_point = _quantize(x, bits)
        return torch.round(x / scale).long() + zero_point, scale, zero_point
    assert compress.check_quantize(no_clamp, show=False).passed


def test_the_zero_tensor_gets_its_own_hint():
    result = compress.check_quantize(WRONG["quantize"][-2][0], show=False)
    assert "ZeroDivisionError" in result.message and "scale of 1.0" in result.hint


def test_a_crash_at_sparsity_0_or_1_gets_its_own_hint():
    def sorted_threshold(w, s):  # a threshold read at index k: out of range at sparsity 1
        k = round(s * w.numel())
        return (w.abs() >= w.detach().abs().flatten().sort().values[k]).float()
    result = compress.check_magnitude_prune(sorted_threshold, show=False)
    assert "sparsity 1.0" in result.message and "IndexError" in result.message and "all zeros" in result.hint


def test_checkers_refuse_in_place_changes():
    def quantize_in_place(x, bits=8):
        out = _quantize(x, bits)
        x.mul_(2)
        return out
    assert "in place" in compress.check_quantize(quantize_in_place, show=False).message
    def dequantize_in_place(q, scale, zero_point):
        out = _dequantize(q, scale, zero_point)
        q.zero_()
        return out
    assert "in place" in compress.check_dequantize(dequantize_in_place, show=False).message
    def prune_in_place(weight, sparsity):
        mask = _prune(weight, sparsity)
        weight.data.mul_(mask)
        return mask
    assert "in place" in compress.check_magnitude_prune(prune_in_place, show=False).message


# ---- the oracles, checked against each other ----

def test_the_scale_and_zero_point_are_min_max_observers():
    observer = pytest.importorskip("torch.ao.quantization").MinMaxObserver
    for text, x, bits in compress._quantize_cases(0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs = observer(quant_min=0, quant_max=2**bits - 1, dtype=torch.quint8)
            obs(x)
            scale, zero_point = obs.calculate_qparams()
        if x.abs().max() == 0:
            assert compress._qparams(x, bits) == (1.0, 0) and zero_point.item() == 0 and 0 < scale.item() < 1e-6, text
        else:
            assert compress._qparams(x, bits) == (scale.item(), zero_point.item()), text


def test_pytorchs_two_quantizers_agree_and_round_trip_within_half_a_step():
    quantized = 0
    for text, x, bits in compress._quantize_cases(0)[:-1]:
        scale, zero_point = compress._qparams(x, bits)
        codes = compress._torch_codes(x, scale, zero_point, bits)
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1, text
        assert ((codes - zero_point) * scale - x).abs().max() <= scale / 2 * (1 + 1e-5), text
        assert torch.equal(compress._torch_codes(torch.zeros(3), scale, zero_point, bits), torch.full((3,), zero_point)), text
        if bits == 8 and (codes8 := compress._quint8_codes(x, scale, zero_point)) is not None:
            assert torch.equal(codes8, codes), text
            quantized += 1
        assert compress._near_tie(x, scale).float().mean() < 0.01, text  # few values are left out of the comparison
    assert quantized in (0, 2)  # both 8-bit cases, where torch.quantize_per_tensor still exists


def test_prune_mask_zeroes_exactly_the_smallest_magnitudes():
    gen = torch.Generator().manual_seed(4)
    for shape, sparsity in (((24, 16), 0.5), ((5, 7), 0.45), ((8, 3, 3, 3), 0.9), ((6, 9), 1.0), ((12, 20), 0.0)):
        w = compress._distinct_weights(shape, gen)
        assert w.abs().flatten().unique().numel() == w.numel()  # no ties
        mask, k = compress._torch_prune_mask(w, sparsity), round(sparsity * w.numel())
        assert mask.shape == w.shape and int((mask == 0).sum()) == k
        if 0 < k < w.numel(): assert w.abs()[mask == 0].max() < w.abs()[mask == 1].min()
    # torch counts with Python's round, which rounds halves to even: the reason the check's cases have no halves
    assert int((compress._torch_prune_mask(compress._distinct_weights((1, 5), gen), 0.5) == 0).sum()) == 2


def test_soft_targets_oracle_is_the_kl_sum_and_its_gradient_the_closed_form():
    gen = torch.Generator().manual_seed(6)
    for b, c, T in ((8, 10, 2.0), (3, 50, 10.0), (16, 6, 0.5)):
        s, t = 2 * torch.randn(b, c, generator=gen, dtype=torch.float64), 3 * torch.randn(b, c, generator=gen, dtype=torch.float64)
        p_t = F.softmax(t / T, -1)
        by_hand = T**2 * (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum() / b
        leaf = s.clone().requires_grad_(True)
        oracle = compress._soft_targets(leaf, t, T)
        assert torch.allclose(oracle, by_hand, rtol=1e-12)
        oracle.backward()
        assert torch.allclose(leaf.grad, T * (F.softmax(s / T, -1) - p_t) / b, rtol=1e-10, atol=1e-14)


def test_the_solutions_do_not_call_the_oracles():
    "The reference solutions are plain PyTorch: none calls what the checks compare with."
    solutions = [c.source for c in nbformat.read(SOLUTION, as_version=4).cells if ex.BEGIN_SOLUTION in c.source]
    assert len(solutions) == len(NAMES)
    for oracle in ("quantize_per_tensor", "fake_quantize", "torch.ao", "prune.", "ptm_course.compress"):
        assert not any(oracle in s for s in solutions), oracle


# ---- the notebooks, and one grading run ----

globals().update(notebook_tests(CHAPTER, NAMES, ("zero_point = min(max(round(-lo / scale), 0), qmax)", "return (q.float() - zero_point) * scale",
                                      "smallest = weight.detach().abs().flatten().argsort()[:k]",
                                      "log_p_teacher = F.log_softmax(teacher_logits.detach() / T, dim=-1)"), "95_checks_compress", TIMEOUT))
