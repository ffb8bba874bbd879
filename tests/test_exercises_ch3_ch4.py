"""The exercises of chapters 3 (pretraining objectives) and 4 (MNIST): their checkers and notebooks.

Every checker must pass the reference solution (taken from the solution notebook itself), report
the student stub as not attempted, survive crashes and wrong types, leave the learner's random
state alone, and fail typical wrong answers with the right hint. The wrong answers are written
out here, independently of the mistake models inside the checkers. One module-scoped `grade` run
scores the two solution notebooks (1.0) and the two student notebooks (0.0)."""
import concurrent.futures
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exercise_helpers import (
    ROOT, assert_graded, assert_student_notebook, assert_unchanged_by_nbdev_clean,
    checker_tests, functions_of, grade, passive_openmp_waits, solution_notebook, student_notebook)
from ptm_course import exercises as ex
from ptm_course.checks import mnist as mn
from ptm_course.checks import objectives as obj

CHAPTERS = {
    "03_objectives": (obj, ["denoising_loss", "causal_lm_loss", "perplexity", "mask_tokens", "masked_lm_loss", "distillation_loss"]),
    "04_mnist": (mn, ["output_shape", "accuracy", "confusion_matrix", "train_step", "freeze_encoder", "mask_pixels"]),
}
SOLUTIONS = {ch: solution_notebook(ch) for ch in CHAPTERS}
STUDENTS = {ch: student_notebook(ch) for ch in CHAPTERS}
EXERCISES = [name for _, names in CHAPTERS.values() for name in names]
CHECKERS = {name: getattr(module, f"check_{name}") for module, names in CHAPTERS.values() for name in names}
TIMEOUT = 120  # seconds per cell when grading: generous, since the first transformers import is slow on a busy machine


REFERENCE = {k: v for ch, (_, names) in CHAPTERS.items() for k, v in functions_of(SOLUTIONS[ch], names).items()}
STUBS = {k: v for ch, (_, names) in CHAPTERS.items() for k, v in functions_of(STUDENTS[ch], names).items()}


# ---- typical wrong answers, per exercise: (function, "hint" or "message", words it must contain) ----

def _denoise(model, x, mask, target="clean", where="hidden", show="corrupted", per_image=False):
    corrupted = x.masked_fill(mask, 0.0)
    out = model(corrupted if show == "corrupted" else x)
    err = (out - (x if target == "clean" else corrupted)) ** 2
    keep = mask if where == "hidden" else torch.ones_like(mask)
    if per_image: return torch.stack([e[k].mean() for e, k in zip(err, keep)]).mean()
    return err[keep].mean()

def _causal(logits, ids, mask, shift=True, use_mask=True, source_mask=False, per_sequence=False):
    lg, tg = (logits[:, :-1], ids[:, 1:]) if shift else (logits, ids)
    keep = (mask[:, :-1] if source_mask else mask[:, 1:] if shift else mask).bool() if use_mask else torch.ones_like(tg, dtype=torch.bool)
    if per_sequence:
        return torch.stack([F.cross_entropy(l[k], t[k]) for l, t, k in zip(lg, tg, keep)]).mean()
    return F.cross_entropy(lg[keep], tg[keep])

def _bert_mask(ids, tokenizer, p=0.15, generator=None, fixed_p=None, specials=True, mask_share=0.8, random_share=0.5,
               labels_everywhere=False, zero_labels=False, use_generator=True):
    gen = generator if use_generator else None
    p = fixed_p if fixed_p is not None else p
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) if specials else torch.zeros_like(ids, dtype=torch.bool)
    selected = (torch.rand(ids.shape, generator=gen) < p) & ~special
    u, v = torch.rand(ids.shape, generator=gen), torch.rand(ids.shape, generator=gen)
    inputs = ids.masked_fill(selected & (u < mask_share), tokenizer.mask_token_id)
    to_random = selected & (u >= mask_share) & (v < random_share)
    inputs = torch.where(to_random, torch.randint(len(tokenizer), ids.shape, generator=gen), inputs)
    labels = ids.clone() if labels_everywhere else ids.masked_fill(~selected, 0 if zero_labels else -100)
    return inputs, labels

def _mlm(logits, labels, per_sequence=False, all_positions=False, shift=False, axis=-1):
    if shift: logits, labels = logits[:, :-1], labels[:, 1:]
    logp = logits.log_softmax(axis)
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    keep = labels != -100
    if per_sequence: return torch.stack([n[k].mean() for n, k in zip(nll, keep)]).mean()
    return (nll * keep).sum() / (keep.numel() if all_positions else keep.sum())

def _distill(s, t, y, T, alpha, t_power=2, swap=False, reduction="batchmean", alpha_on_hard=False, detach_soft=False):
    ps_log, pt_log = F.log_softmax((s.detach() if detach_soft else s) / T, -1), F.log_softmax(t / T, -1)
    a, b = (ps_log, pt_log) if not swap else (pt_log, ps_log)
    kl_rows = (b.exp() * (b - a))
    kl = kl_rows.sum() / {"batchmean": len(s), "mean": kl_rows.numel(), "sum": 1}[reduction]
    w = 1 - alpha if alpha_on_hard else alpha
    return w * T**t_power * kl + (1 - w) * F.cross_entropy(s, y)

def _shape(layers, shape, ceil=False, padding=True, pool_stride=True, flatten_channels=True, divide=lambda a, b: a // b):
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            two = lambda v: v if isinstance(v, tuple) else (v, v)
            k, s, p, d = two(layer.kernel_size), two(layer.stride), two(layer.padding), two(getattr(layer, "dilation", 1))
            if not pool_stride and not isinstance(layer, nn.Conv2d): s = (1, 1)
            if not padding: p = (0, 0)
            size = [(n + 2 * p[i] - d[i] * (k[i] - 1) - 1) for i, n in enumerate(shape[1:])]
            size = [(-(-a // s[i]) if ceil else divide(a, s[i])) + 1 for i, a in enumerate(size)]
            shape = (layer.out_channels if isinstance(layer, nn.Conv2d) else shape[0], *size)
        elif isinstance(layer, nn.Flatten): shape = (math.prod(shape if flatten_channels else shape[1:]),)
        elif isinstance(layer, nn.Linear): shape = (layer.out_features,)
    return tuple(shape)

def _step(model, x, y, lr, zero=True, sign=1.0, softmax=False, rebind=False, loss_after=False):
    if zero: model.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits.softmax(1) if softmax else logits, y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if rebind: p = p - lr * p.grad
            else: p -= sign * lr * p.grad
    return F.cross_entropy(model(x), y).item() if loss_after else loss.item()

def _freeze(encoder, head, lr, how="params", params="head", lr_used=None):
    if how == "params": encoder.requires_grad_(False)
    elif how == "attribute": encoder.requires_grad = False
    elif how == "eval": encoder.eval()
    chosen = {"head": list(head.parameters()), "all": list(encoder.parameters()) + list(head.parameters()), "weight": [head.weight]}[params]
    return torch.optim.SGD(chosen, lr=lr if lr_used is None else lr_used)

def _pixels(images, fraction, generator=None, shared=False, keep=False, zero_visible=False, noise=False, use_generator=True):
    gen = generator if use_generator else None
    shape = images.shape[1:] if shared else images.shape
    u = torch.rand(shape, generator=gen).expand_as(images)
    mask = u > fraction if keep else u < fraction
    if noise: return images + 0.5 * mask, mask
    return (images.masked_fill(~mask, 0.0) if zero_visible else images.masked_fill(mask, 0.0)), mask

def _accuracy(logits, labels, dim=1, count=False, percent=False, generous_ties=False):
    if generous_ties: hit = logits.gather(1, labels[:, None]).squeeze(1) == logits.max(1).values
    else: hit = logits.argmax(dim) == labels
    return hit.sum().item() if count else 100 * hit.float().mean().item() if percent else hit.float().mean().item()

def _confusion(p, y, k, transpose=False, accumulate=True, from_data=False, normalise=False):
    if from_data: k = int(max(p.max(), y.max())) + 1
    m = torch.zeros(k, k, dtype=torch.long)
    if accumulate: m.index_put_((y, p), torch.ones_like(y), accumulate=True)
    else: m[y, p] += 1
    if normalise: m = m / m.sum(1, keepdim=True).clamp_min(1)
    return m.T if transpose else m

WRONG = {
    "denoising_loss": [
        (lambda m, x, k: _denoise(m, x, k, where="all"), "hint", "every pixel"),
        (lambda m, x, k: _denoise(m, x, k, target="corrupted"), "hint", "target is the clean image"),
        (lambda m, x, k: _denoise(m, x, k, show="clean"), "hint", "clean images"),
        (lambda m, x, k: _denoise(m, x, k, per_image=True), "hint", "mean per image"),
    ],
    "causal_lm_loss": [
        (lambda lg, ids, m: _causal(lg, ids, m, shift=False), "hint", "no shift"),
        (lambda lg, ids, m: _causal(lg, ids, m, use_mask=False), "hint", "padding is counted"),
        (lambda lg, ids, m: _causal(lg, ids, m, source_mask=True), "hint", "predicted token (t + 1) is real"),
        (lambda lg, ids, m: _causal(lg, ids, m, per_sequence=True), "hint", "per-sequence mean"),  # NaN on a 1-token sequence
    ],
    "perplexity": [
        (lambda l, n: math.exp(l.mean().item()), "hint", "weight each batch"),
        (lambda l, n: l.exp().mean().item(), "hint", "per-batch perplexities"),
        (lambda l, n: 2 ** ((l * n).sum() / n.sum()).item(), "hint", "nats"),
        (lambda l, n: ((l * n).sum() / n.sum()).item(), "hint", "its exponential"),
    ],
    "mask_tokens": [
        (lambda ids, tok, mlm_probability=0.15, generator=None: _bert_mask(ids, tok, mlm_probability, generator, mask_share=1.0), "hint", "80 %"),
        (lambda ids, tok, mlm_probability=0.15, generator=None: _bert_mask(ids, tok, mlm_probability, generator, specials=False), "hint", "never be masked"),
        (lambda ids, tok, mlm_probability=0.15, generator=None: _bert_mask(ids, tok, mlm_probability, generator, random_share=0.1), "hint", "half of the 20 %"),
        (lambda ids, tok, mlm_probability=0.15, generator=None: _bert_mask(ids, tok, mlm_probability, generator, labels_everywhere=True), "message", "almost every position"),
        (lambda ids, tok, mlm_probability=0.15, generator=None: _bert_mask(ids, tok, mlm_probability, generator, zero_labels=True), "hint", "-100"),
        (lambda ids, tok, mlm_probability=0.15, generator=None: _bert_mask(ids, tok, mlm_probability, generator, fixed_p=0.15), "hint", "mlm_probability is an argument"),
        (lambda ids, tok, mlm_probability=0.15, generator=None: _bert_mask(ids, tok, mlm_probability, generator, use_generator=False), "hint", "generator you are given"),
    ],
    "masked_lm_loss": [
        (lambda lg, y: _mlm(lg, y, all_positions=True), "hint", "number of labelled positions"),
        (lambda lg, y: _mlm(lg, y, per_sequence=True), "hint", "per-sequence mean"),  # NaN on the row without labels
        (lambda lg, y: _mlm(lg, y, shift=True), "hint", "no shift"),
        (lambda lg, y: _mlm(lg, y, axis=1), "hint", "wrong dimension"),
    ],
    "distillation_loss": [
        (lambda s, t, y, T, a: _distill(s, t, y, T, a, t_power=0), "hint", "T**2"),
        (lambda s, t, y, T, a: _distill(s, t, y, T, a, swap=True), "hint", "wrong way round"),
        (lambda s, t, y, T, a: _distill(s, t, y, T, a, reduction="mean"), "hint", "batchmean"),
        (lambda s, t, y, T, a: _distill(s, t, y, T, a, alpha_on_hard=True), "hint", "swapped them"),
        (lambda s, t, y, T, a: _distill(s, t, y, T, a, detach_soft=True), "message", "gradient is not"),
    ],
    "output_shape": [
        (lambda layers, shape: _shape(layers, shape, ceil=True), "hint", "rounds down"),
        (lambda layers, shape: _shape(layers, shape, padding=False), "hint", "padding"),
        (lambda layers, shape: _shape(layers, shape, pool_stride=False), "hint", "kernel size"),
        (lambda layers, shape: _shape(layers, shape, flatten_channels=False), "hint", "channels included"),
        (lambda layers, shape: _shape(layers, shape, divide=lambda a, b: a / b), "message", "holds"),  # fractions and floats
    ],
    "accuracy": [
        (lambda lg, y: _accuracy(lg, y, dim=0), "hint", "dim=1"),
        (lambda lg, y: _accuracy(lg, y, count=True), "hint", "number of correct"),
        (lambda lg, y: _accuracy(lg, y, percent=True), "hint", "percentage"),
        (lambda lg, y: _accuracy(lg, y, generous_ties=True), "hint", "tie"),
    ],
    "confusion_matrix": [
        (lambda p, y, k: _confusion(p, y, k, transpose=True), "hint", "transposed"),
        (lambda p, y, k: _confusion(p, y, k, accumulate=False), "hint", "accumulate"),
        (lambda p, y, k: _confusion(p, y, k, from_data=True), "hint", "num_classes"),
        (lambda p, y, k: _confusion(p, y, k, normalise=True), "hint", "fractions"),
    ],
    "train_step": [
        (lambda m, x, y, lr: _step(m, x, y, lr, zero=False), "hint", "zero them"),
        (lambda m, x, y, lr: _step(m, x, y, lr, sign=-1.0), "hint", "wrong sign"),
        (lambda m, x, y, lr: _step(m, x, y, lr, softmax=True), "hint", "raw logits"),
        (lambda m, x, y, lr: _step(m, x, y, lr, rebind=True), "message", "did not change"),
        (lambda m, x, y, lr: _step(m, x, y, lr, loss_after=True), "hint", "after the update"),
    ],
    "freeze_encoder": [
        (lambda e, h, lr: _freeze(e, h, lr, how="attribute"), "hint", "plain attribute"),
        (lambda e, h, lr: _freeze(e, h, lr, how="eval"), "hint", "eval()"),
        (lambda e, h, lr: _freeze(e, h, lr, params="all"), "hint", "head.parameters() only"),
        (lambda e, h, lr: _freeze(e, h, lr, params="weight"), "message", "misses the head's bias"),
        (lambda e, h, lr: _freeze(e, h, lr, lr_used=0.01), "hint", "lr=lr"),
    ],
    "mask_pixels": [
        (lambda x, f, generator=None: _pixels(x, f, generator, shared=True), "message", "same mask"),
        (lambda x, f, generator=None: _pixels(x, f, generator, keep=True), "hint", "fraction to keep"),
        (lambda x, f, generator=None: _pixels(x, f, generator, zero_visible=True), "hint", "zeroed the visible pixels"),
        (lambda x, f, generator=None: _pixels(x, f, generator, noise=True), "hint", "exactly 0"),
        (lambda x, f, generator=None: _pixels(x, f, generator, use_generator=False), "hint", "generator you are given"),
    ],
}


NOTEBOOKS = {path: names for ch, (_, names) in CHAPTERS.items() for path in (SOLUTIONS[ch], STUDENTS[ch])}
globals().update(checker_tests(EXERCISES, CHECKERS, REFERENCE, STUBS, WRONG, NOTEBOOKS))  # stub not attempted, typical mistakes caught, crashes survived


def test_checkers_refuse_in_place_changes():
    def denoise_in_place(model, images, mask):
        images.masked_fill_(mask, 0.0)
        return ((model(images) - images)[mask] ** 2).mean()
    assert "in place" in obj.check_denoising_loss(denoise_in_place, show=False).message
    def mask_in_place(ids, tok, mlm_probability=0.15, generator=None):
        inputs, labels = _bert_mask(ids, tok, mlm_probability, generator)
        ids.copy_(inputs)
        return inputs, labels
    assert "in place" in obj.check_mask_tokens(mask_in_place, show=False).message
    def pixels_in_place(images, fraction, generator=None):
        mask = torch.rand(images.shape, generator=generator) < fraction
        return images.masked_fill_(mask, 0.0), mask
    assert "in place" in mn.check_mask_pixels(pixels_in_place, show=False).message


def test_loss_checkers_want_a_differentiable_tensor():
    result = obj.check_masked_lm_loss(lambda lg, y: F.cross_entropy(lg.flatten(0, 1), y.flatten()).item(), show=False)
    assert not result.passed and ".item()" in result.hint
    result = obj.check_causal_lm_loss(lambda lg, ids, m: _causal(lg.detach(), ids, m), show=False)
    assert not result.passed and "gradient" in result.message


# ---- the oracles, checked against each other ----

def test_confusion_matrix_oracle_agrees_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(5)
    y, p = torch.randint(7, (300,), generator=gen), torch.randint(7, (300,), generator=gen)
    ours = torch.bincount(y * 7 + p, minlength=49).view(7, 7)
    assert (ours.numpy() == metrics.confusion_matrix(y.numpy(), p.numpy(), labels=list(range(7)))).all()
    assert mn.check_confusion_matrix(lambda p, y, k: torch.as_tensor(metrics.confusion_matrix(y, p, labels=list(range(k)))),
                                     show=False).passed


def test_accuracy_oracle_breaks_ties_like_torch_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    assert logits.argmax(1).tolist() == [1, 0]
    assert mn.check_accuracy(lambda lg, y: (lg.argmax(1) == y).float().mean(), show=False).passed


def test_causal_oracles_agree():
    from transformers.loss.loss_utils import ForCausalLMLoss
    logits, ids, mask, gpt2_loss = obj._causal_case([7, 3, 5], 8, 40, torch.Generator().manual_seed(2), gpt2=True)
    assert torch.allclose(ForCausalLMLoss(logits, ids.masked_fill(mask == 0, -100), vocab_size=40), gpt2_loss, atol=1e-6)


def test_bert_masking_oracle_follows_the_80_10_10_rule():
    for p, (batch, length), seed in ((0.15, (256, 128), 10), (0.3, (96, 96), 20)):
        c = obj._collator_stats(p, batch, length, seed)
        assert obj._z(c["selected"], c["n_ordinary"], p) < 5
        assert obj._z(c["mask"], c["n_selected"], 0.8) < 5 and obj._z(c["random"], c["n_selected"], 0.1) < 5


# ---- the student notebooks ----

def test_student_notebooks_are_up_to_date():
    wanted = ex.student_notebooks(ROOT)
    assert {p.resolve() for p in STUDENTS.values()} <= set(wanted)
    stale = [p for p in ex.stale_student_notebooks(ROOT) if p.name in {s.name for s in STUDENTS.values()}]
    assert not stale, f"stale student notebooks {stale}: run `ptm-course exercises` and commit them"


@pytest.mark.parametrize("chapter", list(CHAPTERS))
def test_student_notebook_has_stubs_and_no_solutions_or_outputs(chapter):
    assert_student_notebook(chapter, {"03_objectives": ("inputs[to_random] = random_ids[to_random]", "return alpha * T**2 * kl"),
                                      "04_mnist": ("height, width = [(n + 2 * p[i]", "matrix.index_put_((labels, predictions)")}[chapter],
                            len(CHAPTERS[chapter][1]))


@pytest.mark.parametrize("chapter", list(CHAPTERS))
def test_notebooks_are_unchanged_by_nbdev_clean(chapter):
    assert_unchanged_by_nbdev_clean(STUDENTS[chapter], SOLUTIONS[chapter])


# ---- grading ----

@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    "One `grade` run per chapter (its solution and its student notebook), the two chapters side by side: 4 kernels, 2 at a time."
    tmp = tmp_path_factory.mktemp("grade")
    t0 = time.monotonic()
    with passive_openmp_waits(), concurrent.futures.ThreadPoolExecutor(len(CHAPTERS)) as pool:
        runs = dict(zip(CHAPTERS, pool.map(lambda ch: grade([SOLUTIONS[ch], STUDENTS[ch]], tmp/f"{ch}.json", TIMEOUT), CHAPTERS)))
    results = {f"{kind} {ch}": r for ch, (_, (sol, stu)) in runs.items() for kind, r in (("solution", sol), ("student", stu))}
    return dict(rc=[rc for rc, _ in runs.values()], results=results, seconds=time.monotonic() - t0)


@pytest.mark.parametrize("chapter", list(CHAPTERS))
def test_grade_scores_the_solution_one(graded, chapter):
    assert graded["rc"] == [0, 0]
    assert_graded(graded["results"][f"solution {chapter}"], CHAPTERS[chapter][1], ex.PASSED)


@pytest.mark.parametrize("chapter", list(CHAPTERS))
def test_grade_scores_the_student_notebook_zero(graded, chapter):
    assert_graded(graded["results"][f"student {chapter}"], CHAPTERS[chapter][1], ex.NOT_ATTEMPTED)
