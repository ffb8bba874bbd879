"""The pretraining losses of chapter 3, checked against transformers (the causal-LM loss, BERT's masking), cross-entropy written out
by hand, and the formula for the distillation gradient; wrong inputs raise ValueError saying what is wrong."""
import math

import pytest
import torch
import torch.nn.functional as F

from ptm_course.objectives import (IGNORE_INDEX, causal_lm_loss, distillation_loss, mask_tokens, masked_lm_loss,
                                   reconstruction_loss)


# ---------------------------------------------------------------------------------------------------------------- causal LM
@pytest.fixture(scope="module")
def padded_batch():
    "A tiny GPT-2 built from a config (no download), a right-padded batch, and transformers' own loss for it."
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    lengths = [20, 13, 5, 1]
    ids = torch.randint(1, 97, (len(lengths), 20))
    mask = (torch.arange(20)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad(): out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return ids, mask, labels, out.logits, out.loss


def test_causal_lm_loss_equals_transformers_with_padding(padded_batch):
    from transformers.loss.loss_utils import ForCausalLMLoss
    ids, mask, labels, logits, hf_loss = padded_batch
    assert mask.min() == 0  # padding present
    ours = causal_lm_loss(logits, ids, attention_mask=mask)
    torch.testing.assert_close(ours, hf_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours, ForCausalLMLoss(logits, labels, logits.shape[-1]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(causal_lm_loss(logits, labels), hf_loss, atol=1e-6, rtol=1e-6)  # padding marked -100


def test_causal_lm_loss_is_shifted_and_ignores_padding(padded_batch):
    ids, mask, labels, logits, hf_loss = padded_batch
    unshifted = F.cross_entropy(logits[mask == 1], ids[mask == 1])
    assert not torch.isclose(unshifted, hf_loss, atol=1e-3)  # the test would catch a missing shift
    garbage = logits.clone(); garbage[mask == 0] = 1e4*torch.randn_like(garbage[mask == 0])
    garbage[:, -1] = 1e4  # scores at the last position predict nothing
    torch.testing.assert_close(causal_lm_loss(garbage, ids, mask), hf_loss, atol=1e-6, rtol=1e-6)
    with_padding_counted = causal_lm_loss(logits, ids)
    assert not torch.isclose(with_padding_counted, hf_loss, atol=1e-3)  # and one that counted padding


def test_causal_lm_loss_by_hand():
    torch.manual_seed(1)
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    logp = logits.log_softmax(-1)
    by_hand = -torch.stack([logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(5)]).mean()
    torch.testing.assert_close(causal_lm_loss(logits, ids), by_hand)
    one_token = causal_lm_loss(torch.randn(3, 1, 11, requires_grad=True), torch.zeros(3, 1, dtype=torch.long))
    assert one_token.item() == 0 and one_token.requires_grad  # nothing to predict: zero, still differentiable


# ------------------------------------------------------------------------------------------------------------ reconstruction
def test_reconstruction_loss_tokens_and_real_values():
    torch.manual_seed(2)
    x, x_hat = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(reconstruction_loss(x_hat, x), ((x - x_hat)**2).mean())
    assert reconstruction_loss(x, x) == 0
    logits, ids = torch.randn(3, 7, 20), torch.randint(0, 20, (3, 7))
    mask = torch.ones_like(ids); mask[0, 4:] = 0
    torch.testing.assert_close(reconstruction_loss(logits, ids), F.cross_entropy(logits.reshape(-1, 20), ids.reshape(-1)))
    torch.testing.assert_close(reconstruction_loss(logits, ids, mask), F.cross_entropy(logits[mask == 1], ids[mask == 1]))


# --------------------------------------------------------------------------------------------------------------- masking
@pytest.fixture(scope="module")
def tokenizer():
    from ptm_course.data import load_tokenizer
    return load_tokenizer()


@pytest.fixture(scope="module")
def austen_batch(tokenizer):
    "About 2,000 paragraphs of Pride and Prejudice, padded to 64 tokens (a third of the positions are padding)."
    from ptm_course.data import austen_novels
    paragraphs = [p for p in austen_novels()["Pride and Prejudice"].split("\n\n") if p.strip()][:3000]
    return tokenizer(paragraphs, truncation=True, max_length=64, padding="max_length", return_tensors="pt").input_ids


def masking_statistics(original, inputs, labels, tokenizer) -> dict:
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    chosen = labels != IGNORE_INDEX
    seen = inputs[chosen]
    return dict(n_ordinary=int((~special).sum()), n_chosen=int(chosen.sum()), chosen=chosen[~special].float().mean().item(),
                mask=(seen == tokenizer.mask_token_id).float().mean().item(),
                random=((seen != tokenizer.mask_token_id) & (seen != original[chosen])).float().mean().item(),
                kept=(seen == original[chosen]).float().mean().item(),
                special_chosen=int((chosen & special).sum()), unchosen_changed=int((inputs != original)[~chosen].sum()),
                labels_right=bool(torch.equal(labels[chosen], original[chosen])))


def assert_binomial(p_hat, p, n, what, z=4.5):
    sd = math.sqrt(p*(1 - p)/n)
    assert abs(p_hat - p) <= z*sd, f"{what}: {p_hat:.4f}, expected {p} ± {z*sd:.4f} ({z} sd for n = {n})"


def check_bert_statistics(s, who):
    assert_binomial(s["chosen"], 0.15, s["n_ordinary"], f"{who}: fraction of ordinary tokens chosen")
    for kind, p in [("mask", 0.8), ("random", 0.1), ("kept", 0.1)]:
        assert_binomial(s[kind], p, s["n_chosen"], f"{who}: fraction of chosen tokens {kind}")
    assert s["special_chosen"] == 0, f"{who} chose {s['special_chosen']} special/padding tokens"
    assert s["unchosen_changed"] == 0, f"{who} changed {s['unchosen_changed']} tokens it did not choose"
    assert s["labels_right"], f"{who}: labels at chosen positions are not the original tokens"


def test_mask_tokens_matches_data_collator_statistics(tokenizer, austen_batch):
    from transformers import DataCollatorForLanguageModeling
    assert (austen_batch == tokenizer.pad_token_id).float().mean() > 0.1  # padding present
    ours = masking_statistics(austen_batch, *mask_tokens(austen_batch, tokenizer, 0.15, torch.Generator().manual_seed(11)), tokenizer)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=12)
    batch = collator([{"input_ids": row} for row in austen_batch.tolist()])
    theirs = masking_statistics(austen_batch, batch["input_ids"], batch["labels"], tokenizer)
    assert ours["n_ordinary"] > 50_000
    check_bert_statistics(theirs, "DataCollatorForLanguageModeling")  # the oracle passes the same check
    check_bert_statistics(ours, "mask_tokens")
    for key, n in [("chosen", "n_ordinary"), ("mask", "n_chosen"), ("random", "n_chosen"), ("kept", "n_chosen")]:
        p = (ours[key] + theirs[key])/2  # two independent samples of the same proportion
        sd = math.sqrt(2*p*(1 - p)/ours[n])
        assert abs(ours[key] - theirs[key]) <= 4.5*sd, f"{key}: ours {ours[key]:.4f} vs transformers {theirs[key]:.4f}"


def test_statistics_check_catches_wrong_masking(tokenizer, austen_batch):
    "The check above can fail: always [MASK], or a 20% rate, or masking padding, are all caught."
    g = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(austen_batch, tokenizer, 0.15, g)
    chosen = labels != IGNORE_INDEX
    always_mask = austen_batch.masked_fill(chosen, tokenizer.mask_token_id)
    with pytest.raises(AssertionError, match="chosen tokens mask"):
        check_bert_statistics(masking_statistics(austen_batch, always_mask, labels, tokenizer), "always [MASK]")
    with pytest.raises(AssertionError, match="ordinary tokens chosen"):
        check_bert_statistics(masking_statistics(austen_batch, *mask_tokens(austen_batch, tokenizer, 0.2, g), tokenizer), "20%")
    pad_too = labels.masked_fill(austen_batch == tokenizer.pad_token_id, tokenizer.pad_token_id)
    with pytest.raises(AssertionError):
        check_bert_statistics(masking_statistics(austen_batch, inputs, pad_too, tokenizer), "pads chosen")


def test_mask_tokens_edge_cases(tokenizer, austen_batch):
    small = austen_batch[:50]
    inputs, labels = mask_tokens(small, tokenizer, 0.0)
    assert torch.equal(inputs, small) and (labels == IGNORE_INDEX).all()
    inputs, labels = mask_tokens(small, tokenizer, 1.0)
    special = torch.isin(small, torch.tensor(tokenizer.all_special_ids))
    assert (labels[~special] == small[~special]).all() and (labels[special] == IGNORE_INDEX).all()
    a = mask_tokens(small, tokenizer, generator=torch.Generator().manual_seed(5))
    b = mask_tokens(small, tokenizer, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # a seeded generator makes it reproducible
    assert torch.equal(small, austen_batch[:50])  # the input is not modified in place


# ----------------------------------------------------------------------------------------------------------- masked LM loss
def test_masked_lm_loss_is_cross_entropy_over_labelled_positions_only():
    torch.manual_seed(3)
    logits = torch.randn(4, 16, 30, requires_grad=True)
    labels = torch.full((4, 16), IGNORE_INDEX)
    where = torch.rand(4, 16) < 0.2
    labels[where] = torch.randint(0, 30, (int(where.sum()),))
    torch.testing.assert_close(masked_lm_loss(logits, labels), F.cross_entropy(logits[where], labels[where]))
    masked_lm_loss(logits, labels).backward()
    assert (logits.grad[~where] == 0).all() and (logits.grad[where] != 0).any()  # unlabelled positions get no gradient
    nothing = masked_lm_loss(logits, torch.full((4, 16), IGNORE_INDEX))
    assert nothing.item() == 0 and nothing.requires_grad


# ---------------------------------------------------------------------------------------------------------- distillation
@pytest.fixture
def close_logits():
    torch.manual_seed(4)
    teacher = torch.randn(128, 10)
    return teacher, teacher + 0.1*torch.randn(128, 10)  # student logits differ from the teacher's by small amounts


def test_distillation_gradient_matches_formula_and_keeps_its_scale(close_logits):
    teacher, student = close_logits
    norms, unscaled = [], []
    for T in (1, 2, 4, 8):
        s = student.clone().requires_grad_()
        grad, = torch.autograd.grad(distillation_loss(s, teacher, temperature=T), s)
        formula = T*(torch.softmax(student/T, -1) - torch.softmax(teacher/T, -1))/len(student)
        torch.testing.assert_close(grad, formula, atol=1e-7, rtol=1e-4)
        norms.append(grad.norm().item()); unscaled.append(grad.norm().item()/T**2)
    assert max(norms)/min(norms) < 1.5, f"gradient norm drifts with T: {norms}"
    assert max(unscaled)/min(unscaled) > 30  # without T² the same check fails: the test can tell
    delta = student - teacher
    limit = (delta - delta.mean(-1, keepdim=True)).norm().item()/(10*len(student))  # Hinton et al.'s high-T approximation
    assert abs(norms[-1] - limit)/limit < 0.05


def test_distillation_loss_terms(close_logits):
    teacher, student = close_logits
    y = torch.randint(0, 10, (len(student),))
    torch.testing.assert_close(distillation_loss(student, teacher, y, temperature=3, alpha=0), F.cross_entropy(student, y))
    p_t, log_p_s = torch.softmax(teacher/3, -1), torch.log_softmax(student/3, -1)
    kl = (p_t*(p_t.log() - log_p_s)).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, y, temperature=3, alpha=1), 9*kl)
    torch.testing.assert_close(distillation_loss(student, teacher, temperature=3), 9*kl)  # no labels: the soft term
    mixed = distillation_loss(student, teacher, y, temperature=3, alpha=0.25)
    torch.testing.assert_close(mixed, 0.25*9*kl + 0.75*F.cross_entropy(student, y))  # alpha weights the soft term
    assert distillation_loss(teacher, teacher, temperature=3) < 1e-6
    s = student.clone().requires_grad_(); t = teacher.clone().requires_grad_()
    distillation_loss(s, t, y).backward()
    assert t.grad is None  # the teacher is not trained
    seq_y = y.view(8, 16).clone(); seq_y[:, 12:] = IGNORE_INDEX  # padded rows count in neither term
    keep = seq_y.reshape(-1) != IGNORE_INDEX
    torch.testing.assert_close(distillation_loss(student.view(8, 16, 10), teacher.view(8, 16, 10), seq_y, 3, 0.5),
                               distillation_loss(student[keep], teacher[keep], y[keep], 3, 0.5))


# ------------------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("call, message", [
    (lambda: causal_lm_loss(torch.randn(2, 5, 9), torch.zeros(2, 6, dtype=torch.long)), "shape"),
    (lambda: causal_lm_loss(torch.randn(2, 5, 9), torch.zeros(2, 5)), "integer"),
    (lambda: causal_lm_loss(torch.randn(2, 5, 9), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4)), "attention_mask"),
    (lambda: reconstruction_loss(torch.randn(2, 5), torch.randn(2, 6)), "shape"),
    (lambda: reconstruction_loss(torch.randn(2, 5, 9), torch.zeros(2, 4, dtype=torch.long)), "shape"),
    (lambda: masked_lm_loss(torch.randn(2, 5, 9), torch.zeros(5, 2, dtype=torch.long)), "shape"),
    (lambda: masked_lm_loss(torch.randn(2, 5, 9), torch.zeros(2, 5)), "integer"),
    (lambda: distillation_loss(torch.randn(4, 3), torch.randn(4, 5)), "shape"),
    (lambda: distillation_loss(torch.randn(4, 3), torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), "labels"),
    (lambda: distillation_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=0), "temperature"),
    (lambda: distillation_loss(torch.randn(4, 3), torch.randn(4, 3), alpha=1.5), "alpha"),
])
def test_wrong_inputs_raise_value_error_saying_what(call, message):
    with pytest.raises(ValueError, match=message): call()


@pytest.mark.parametrize("p", [-0.1, 1.01, 15])
def test_mask_tokens_rejects_probability_outside_unit_interval(tokenizer, p):
    with pytest.raises(ValueError, match=r"mlm_probability.*\[0, 1\]"):
        mask_tokens(torch.tensor([[101, 2000, 102]]), tokenizer, mlm_probability=p)


def test_mask_tokens_needs_a_mask_token_and_integer_ids(tokenizer):
    class NoMask:
        mask_token_id, all_special_ids = None, [0]
        def __len__(self): return 10
    with pytest.raises(ValueError, match="mask token"): mask_tokens(torch.tensor([[1, 2, 3]]), NoMask())
    with pytest.raises(ValueError, match="integer"): mask_tokens(torch.tensor([[1.0, 2.0]]), tokenizer)
