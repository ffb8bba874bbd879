"""The exercises of chapter 2 (data): their checkers and notebooks.

Every checker must pass the reference solution (taken from the solution notebook itself), report
the student stub as not attempted, survive crashes and wrong types, leave the learner's random
state alone, and fail typical wrong answers with the right hint. The wrong answers are written
out here, independently of the mistake models inside the checkers. One module-scoped `grade` run
scores the solution notebook 1.0 and the student notebook 0.0."""
import random

from exercise_helpers import checker_tests, functions_of, notebook_tests, solution_notebook, student_notebook
from ptm_course.checks import data
from ptm_course.data import load_tokenizer

CHAPTER = "02_data"
NAMES = ["grouped_split", "wordpiece"]
SOLUTION, STUDENT = solution_notebook(CHAPTER), student_notebook(CHAPTER)
CHECKERS = {name: getattr(data, f"check_{name}") for name in NAMES}
TIMEOUT = 120  # seconds per exercise when grading: loading the tokenizer is slow on a busy machine

REFERENCE, STUBS = functions_of(SOLUTION, NAMES), functions_of(STUDENT, NAMES)


# ---- typical wrong answers: (function, "hint" or "message", words it must contain) ----

def _split(reviews, fractions=(0.8, 0.1, 0.1), seed=0, per_review=False, cumulative=True, rng=None, in_place=False):
    items = reviews if in_place else list(reviews)
    rng = rng or random.Random(seed)
    if per_review:
        rng.shuffle(items)
        a, b = int(fractions[0] * len(items)), int((fractions[0] + fractions[1]) * len(items))
        return {"train": items[:a], "validation": items[a:b], "test": items[b:]}
    if in_place: rng.shuffle(items)
    movies = sorted({r.movie for r in items})
    rng.shuffle(movies)
    out, count, n = {"train": [], "validation": [], "test": []}, 0, len(items)
    for m in movies:
        group = [r for r in items if r.movie == m]
        bound = (fractions[0] + fractions[1]) if cumulative else fractions[1]
        out["train" if count < fractions[0] * n else "validation" if count < bound * n else "test"] += group
        count += len(group)
    return out

def _pieces(word, vocab, unk="[UNK]", max_chars=100, shortest=False, hashes=True, partial=False, limit=True):
    if limit and len(word) > max_chars: return [unk]
    out, i = [], 0
    while i < len(word):
        ends = list(range(i + 1, len(word) + 1)) if shortest else list(range(len(word), i, -1))
        for j in ends:
            piece = ("##" if i and hashes else "") + word[i:j]
            if piece in vocab: out.append(piece if hashes else piece); i = j; break
        else:
            if partial: return out + [unk]
            return [unk]
    return out

WRONG = {
    "grouped_split": [
        (lambda r, f=(0.8, 0.1, 0.1), seed=0: _split(r, f, seed, per_review=True), "hint", "split the movies"),
        (lambda r, f=(0.8, 0.1, 0.1), seed=0: _split(r, f, seed, cumulative=False), "hint", "the bounds add up"),
        (lambda r, f=(0.8, 0.1, 0.1), seed=0: _split(r, f, seed, rng=random.Random()), "hint", "random.Random(seed)"),
        (lambda r, f=(0.8, 0.1, 0.1), seed=0: _split(r, f, 0), "hint", "shuffle the movies"),
        (lambda r, f=(0.8, 0.1, 0.1), seed=0: _split(r, f, seed, in_place=True), "message", "changed the list"),
    ],
    "wordpiece": [
        (lambda w, v, unk="[UNK]", max_chars=100: _pieces(w, v, unk, max_chars, shortest=True), "hint", "longest piece first"),
        (lambda w, v, unk="[UNK]", max_chars=100: _pieces(w, v, unk, max_chars, hashes=False), "hint", "with ## in front"),
        (lambda w, v, unk="[UNK]", max_chars=100: _pieces(w, v, unk, max_chars, partial=True), "hint", "the whole word"),
        (lambda w, v, unk="[UNK]", max_chars=100: _pieces(w, v, unk, max_chars, limit=False), "hint", "max_chars"),
    ],
}


def test_the_oracle_is_the_pretrained_tokenizer_on_single_words():
    tokenizer = load_tokenizer()
    vocab = tokenizer.get_vocab()
    for word in data._REAL_WORDS + ["proudest", "disagreeable", "a" * 120]:
        assert data._wordpiece(word, vocab, tokenizer.unk_token) == tokenizer.tokenize(word), word


def test_a_split_of_the_real_corpus_keeps_every_movie_in_one_split():
    from ptm_course.data import load_reviews
    reviews = load_reviews()
    splits = REFERENCE["grouped_split"](reviews, seed=3)
    movies = [{r.movie for r in part} for part in splits.values()]
    assert not (movies[0] & movies[1] or movies[0] & movies[2] or movies[1] & movies[2])
    assert sum(map(len, splits.values())) == len(reviews)


globals().update(checker_tests(NAMES, CHECKERS, REFERENCE, STUBS, WRONG, {SOLUTION: NAMES, STUDENT: NAMES}))
globals().update(notebook_tests(CHAPTER, NAMES, ("random.Random(seed).shuffle(movies)", "if candidate in vocab:"),
                                "97_checks_data", TIMEOUT))
