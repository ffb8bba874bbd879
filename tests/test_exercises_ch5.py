"""The exercises of chapter 5 (BERT pretraining and fine-tuning): their checkers and notebooks.

Every checker must pass the reference solution (taken from the solution notebook itself), report
the student stub as not attempted, survive crashes and wrong types, leave the learner's random
state alone, and fail typical wrong answers with the right hint. The wrong answers are written
out here, independently of the mistake models inside the checkers. The oracles are checked
against each other (sentence-transformers' pooling, a BertModel run with and without padding,
BERT's closed-form schedule). One module-scoped `grade` run scores the solution notebook 1.0 and
the student notebook 0.0."""

import pytest
import torch

from exercise_helpers import (
    checker_tests, functions_of, notebook_tests, solution_notebook, student_notebook)
from ptm_course.checks import bert

CHAPTER = "05_bert"
NAMES = ["mask_tokens_8010", "extended_attention_mask", "mean_pooling", "linear_warmup"]
SOLUTION, STUDENT = solution_notebook(CHAPTER), student_notebook(CHAPTER)
CHECKERS = {name: getattr(bert, f"check_{name}") for name in NAMES}
TIMEOUT = 120  # seconds per cell when grading: generous, since loading transformers and the encoder is slow on a busy machine

REFERENCE, STUBS = functions_of(SOLUTION, NAMES), functions_of(STUDENT, NAMES)


# ---- typical wrong answers, per exercise: (function, "hint" or "message", words it must contain) ----

def _bert_mask(ids, tokenizer, generator, p=0.15, fixed_p=None, specials=True, mask_share=0.8, random_share=0.5,
               labels="original", use_generator=True):
    gen = generator if use_generator else None
    p = fixed_p if fixed_p is not None else p
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) if specials else torch.zeros_like(ids, dtype=torch.bool)
    selected = (torch.rand(ids.shape, generator=gen) < p) & ~special
    u, v = torch.rand(ids.shape, generator=gen), torch.rand(ids.shape, generator=gen)
    inputs = ids.masked_fill(selected & (u < mask_share), tokenizer.mask_token_id)
    to_random = selected & (u >= mask_share) & (v < random_share)
    inputs = torch.where(to_random, torch.randint(len(tokenizer), ids.shape, generator=gen), inputs)
    out = {"original": lambda: ids.masked_fill(~selected, -100), "everywhere": lambda: ids.clone(),
           "corrupted": lambda: inputs.masked_fill(~selected, -100), "zero": lambda: ids.masked_fill(~selected, 0)}[labels]()
    return inputs, out

def _additive(m, dtype=torch.float32, fill=None, reverse=False, scale=True, shape="b11s", as_dtype=True, boolean=False):
    view = {"b11s": m[:, None, None, :], "bs": m, "b1s": m[:, None, :], "b1s1": m[:, None, :, None]}[shape]
    if boolean: return view == 0
    zero_at = view.bool() ^ reverse  # where the mask holds 0: the real tokens (the padding when reversed)
    out = torch.where(zero_at, 0.0, (torch.finfo(dtype).min if fill is None else fill) if scale else 1.0)
    return out.to(dtype) if as_dtype else out.float()

def _pool(h, m, how="mean"):
    w = m.unsqueeze(-1).float()
    total = (h * w).sum(1)
    if how == "mean": return total / w.sum(1)
    if how == "all": return h.mean(1)
    if how == "length": return total / h.shape[1]
    if how == "batch": return total / w.sum()
    if how == "sum": return total
    if how == "cls": return h[:, 0]
    if how == "first_n": return torch.stack([x[:int(k.sum())].mean(0) for x, k in zip(h, m)])
    if how == "max": return h.masked_fill(w == 0, -1e30).max(1).values
    if how == "features": return (h * w).mean(-1)
    if how == "detached": return (total / w.sum(1)).detach()

def _lr(s, base, W, T, ahead=False, from_zero=False, decay=True, clamp=True, guard=True):
    if not guard: return base * max(0.0, min(s / W, (T - s) / (T - W)))
    if s < W: return base * (s + 1 if ahead else s) / W
    if not decay: return base
    f = (T - s) / T if from_zero else (T - s) / max(1, T - W)
    return base * (max(0.0, f) if clamp else f)

WRONG = {
    "mask_tokens_8010": [
        (lambda ids, tok, generator, mlm_probability=0.15: _bert_mask(ids, tok, generator, mlm_probability, specials=False), "hint", "never be masked"),
        (lambda ids, tok, generator, mlm_probability=0.15: _bert_mask(ids, tok, generator, mlm_probability, mask_share=1.0), "hint", "80 %"),
        (lambda ids, tok, generator, mlm_probability=0.15: _bert_mask(ids, tok, generator, mlm_probability, labels="everywhere"), "message", "almost every position"),
        (lambda ids, tok, generator, mlm_probability=0.15: _bert_mask(ids, tok, generator, mlm_probability, labels="corrupted"), "hint", "original token id"),
        (lambda ids, tok, generator, mlm_probability=0.15: _bert_mask(ids, tok, generator, mlm_probability, labels="zero"), "hint", "-100"),
        (lambda ids, tok, generator, mlm_probability=0.15: _bert_mask(ids, tok, generator, mlm_probability, random_share=0.1), "hint", "half of the 20 %"),
        (lambda ids, tok, generator, mlm_probability=0.15: _bert_mask(ids, tok, generator, mlm_probability, fixed_p=0.15), "hint", "mlm_probability is an argument"),
        (lambda ids, tok, generator, mlm_probability=0.15: _bert_mask(ids, tok, generator, mlm_probability, use_generator=False), "message", "global random state"),
    ],
    "extended_attention_mask": [
        (lambda m, dtype=torch.float32: _additive(m, dtype, reverse=True), "hint", "reversed"),
        (lambda m, dtype=torch.float32: _additive(m, dtype, reverse=True, scale=False), "hint", "not multiplied"),  # the 0/1 mask itself
        (lambda m, dtype=torch.float32: _additive(m, dtype, scale=False), "hint", "penalty of 1"),
        (lambda m, dtype=torch.float32: _additive(m, dtype, fill=float("-inf")), "hint", "NaN"),
        (lambda m, dtype=torch.float32: _additive(m, dtype, fill=-10000.0), "hint", "-10000"),
        (lambda m, dtype=torch.float32: _additive(m, torch.float32).to(dtype), "hint", "cast to float16"),
        (lambda m, dtype=torch.float32: _additive(m, dtype, as_dtype=False), "message", "expected torch.float16"),
        (lambda m, dtype=torch.float32: _additive(m, dtype, shape="bs"), "hint", "mask[:, None, None, :]"),
        (lambda m, dtype=torch.float32: _additive(m, dtype, shape="b1s"), "hint", "(batch, 1, 1, seq)"),
        (lambda m, dtype=torch.float32: _additive(m, dtype, shape="b1s1"), "hint", "keys"),
        (lambda m, dtype=torch.float32: _additive(m, dtype, boolean=True), "hint", "float tensor"),
    ],
    "mean_pooling": [
        (lambda h, m: _pool(h, m, "all"), "hint", "padding is included"),
        (lambda h, m: _pool(h, m, "length"), "hint", "sequence length"),
        (lambda h, m: _pool(h, m, "batch"), "hint", "whole batch"),
        (lambda h, m: _pool(h, m, "sum"), "hint", "divide by their number"),
        (lambda h, m: _pool(h, m, "cls"), "hint", "[CLS]"),
        (lambda h, m: _pool(h, m, "first_n"), "hint", "first n positions"),
        (lambda h, m: _pool(h, m, "max"), "hint", "max pooling"),
        (lambda h, m: _pool(h, m, "features"), "hint", "dim=1"),
        (lambda h, m: _pool(h, m, "detached"), "message", "no gradient"),
    ],
    "linear_warmup": [
        (lambda s, b, W, T: _lr(s, b, W, T, ahead=True), "hint", "off by one"),
        (lambda s, b, W, T: _lr(s, b, W, T, from_zero=True), "hint", "starts at the end of warmup"),
        (lambda s, b, W, T: _lr(s, b, W, T, decay=False), "hint", "decays linearly"),
        (lambda s, b, W, T: _lr(s, b, W, T, clamp=False), "hint", "never goes negative"),
        (lambda s, b, W, T: _lr(s, b, W, T, guard=False), "message", "ZeroDivisionError"),
    ],
}


globals().update(checker_tests(NAMES, CHECKERS, REFERENCE, STUBS, WRONG, {SOLUTION: NAMES, STUDENT: NAMES}))


def test_the_zero_division_names_the_schedule_and_the_step():
    result = bert.check_linear_warmup(WRONG["linear_warmup"][-1][0], show=False)
    assert "warmup_steps=0" in result.message and "step 0" in result.message and "division by zero" in result.hint


def test_a_learner_that_uses_the_global_random_state_keeps_it():
    "The masking check runs the learner's function inside fork_rng: even a function that draws from torch's global state leaves it as it was."
    state = torch.get_rng_state()
    assert not bert.check_mask_tokens_8010(WRONG["mask_tokens_8010"][-1][0], show=False).passed
    assert torch.equal(torch.get_rng_state(), state)


def test_checkers_refuse_in_place_changes():
    def mask_in_place(ids, tok, generator, mlm_probability=0.15):
        inputs, labels = _bert_mask(ids, tok, generator, mlm_probability)
        ids.copy_(inputs)
        return inputs, labels
    assert "in place" in bert.check_mask_tokens_8010(mask_in_place, show=False).message
    def additive_in_place(m, dtype=torch.float32):
        out = _additive(m, dtype)
        m.zero_()
        return out
    assert "in place" in bert.check_extended_attention_mask(additive_in_place, show=False).message
    def pool_in_place(h, m):
        out = _pool(h, m)
        m.fill_(1)
        return out
    assert "in place" in bert.check_mean_pooling(pool_in_place, show=False).message


# ---- the oracles, checked against each other ----

def test_mean_pooling_oracle_agrees_with_sentence_transformers():
    pytest.importorskip("sentence_transformers")
    try: from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError: from sentence_transformers.models import Pooling  # sentence-transformers before 6
    pooling = Pooling(12, pooling_mode="mean")  # the dimension is only reported, not checked: the cases have several
    assert bert.check_mean_pooling(lambda h, m: pooling({"token_embeddings": h, "attention_mask": m})["sentence_embedding"],
                                   show=False).passed


def test_the_additive_mask_oracle_is_the_classic_formula_and_makes_bert_ignore_padding():
    mask = bert._mask_batch([5, 2, 0, 4], 5, left=False)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        classic = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # BERT's get_extended_attention_mask
        want = bert._transformers_mask(mask, dtype)
        assert want.dtype == dtype and torch.equal(want, classic)
    # the tiny model's outputs for a sentence do not change when padding is appended and the additive mask is used
    model, ids = bert._tiny_bert(), torch.randint(1, 64, (1, 4), generator=torch.Generator().manual_seed(1))
    padded, m = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1), torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad(): alone = model(input_ids=ids).last_hidden_state
    with_mask = bert._encode((1.0 - m[:, None, None, :].float()) * torch.finfo(torch.float32).min, padded)
    without = bert._encode(torch.zeros(1, 1, 1, 7), padded)
    assert torch.allclose(alone, with_mask[:, :4], atol=1e-5) and not torch.allclose(alone, without[:, :4], atol=1e-3)


def test_schedule_oracle_is_berts_closed_form():
    for base, W, T in ((1e-4, 10, 100), (0.5, 0, 7), (3e-5, 1, 4)):
        got = bert._transformers_schedule(base, W, T, extra=2)
        want = [base * (s / W if s < W else max(0.0, (T - s) / (T - W))) for s in range(T + 3)]
        assert all(abs(g - w) <= 1e-12 for g, w in zip(got, want)), (base, W, T)
        assert got[0] == (0.0 if W else base) and got[W] == pytest.approx(base) and got[T:] == [0.0] * 3


def test_bert_masking_oracle_follows_the_80_10_10_rule_on_the_ch5_batches():
    for case, (p, (batch, length)) in enumerate(((0.15, (256, 128)), (0.4, (96, 96))), 1):
        c = bert._collator_stats(p, batch, length, 100 + 10 * case)
        assert bert._z(c["selected"], c["n_ordinary"], p) < 5
        assert bert._z(c["mask"], c["n_selected"], 0.8) < 5 and bert._z(c["random"], c["n_selected"], 0.1) < 5


# ---- the notebooks, and one grading run ----

globals().update(notebook_tests(CHAPTER, NAMES, ("inputs = torch.where(selected & (fate < 0.8)", "return (1.0 - mask) * torch.finfo(dtype).min",
                                      "return (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1)",
                                      "max(1, total_steps - warmup_steps)"), "94_checks_bert", TIMEOUT))
