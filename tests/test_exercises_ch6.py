"""The exercises of chapter 6 (fine-tuning): their checkers and notebooks.

Every checker must pass the reference solution (taken from the solution notebook itself), report
the student stub as not attempted, survive crashes and wrong types, leave the learner's random
state alone, and fail typical wrong answers with the right hint. The wrong answers are written
out here, independently of the mistake models inside the checkers. One module-scoped `grade` run
scores the solution notebook 1.0 and the student notebook 0.0."""
import torch

from exercise_helpers import checker_tests, functions_of, notebook_tests, solution_notebook, student_notebook
from ptm_course.checks import finetune

CHAPTER = "06_finetuning"
NAMES = ["head_logits", "layerwise_lr_groups"]
SOLUTION, STUDENT = solution_notebook(CHAPTER), student_notebook(CHAPTER)
CHECKERS = {name: getattr(finetune, f"check_{name}") for name in NAMES}
TIMEOUT = 120  # seconds per exercise when grading: importing transformers is slow on a busy machine

REFERENCE, STUBS = functions_of(SOLUTION, NAMES), functions_of(STUDENT, NAMES)


# ---- typical wrong answers: (function, "hint" or "message", words it must contain) ----

def _head(hidden, mask, weight, bias, pooling="mean", with_padding=False, by_length=False, last=False, probabilities=False):
    if pooling == "cls": pooled = hidden[:, -1 if last else 0]
    elif with_padding: pooled = hidden.mean(dim=1)
    else:
        summed = (hidden * mask[..., None].float()).sum(dim=1)
        pooled = summed / (hidden.shape[1] if by_length else mask.sum(dim=1, keepdim=True).float())
    logits = torch.nn.functional.linear(pooled, weight, bias)
    return torch.softmax(logits, dim=1) if probabilities else logits

def _groups(model, base_lr, decay, upwards=False, embeddings_like_layer0=False, head_decayed=False, same=False, forget_pooler=False,
            pooler_twice=False):
    L, out = model.config.num_hidden_layers, []
    layers = model.bert.encoder.layer
    for i, layer in enumerate(layers):
        power = (i + 1) if upwards else (L - i)
        out.append({"params": list(layer.parameters()), "lr": base_lr if same else base_lr * decay ** power})
    emb = [p for p in model.bert.embeddings.parameters() if p.requires_grad]
    if emb: out.append({"params": emb, "lr": base_lr if same else base_lr * decay ** (L if embeddings_like_layer0 else L + 1)})
    head = list(model.classifier.parameters()) + ([] if forget_pooler else list(model.bert.pooler.parameters()))
    out.append({"params": head, "lr": base_lr * decay if head_decayed else base_lr})
    if pooler_twice: out.append({"params": list(model.bert.pooler.parameters()), "lr": base_lr})
    return out

WRONG = {
    "head_logits": [
        (lambda *a, **k: _head(*a, **k, with_padding=True), "hint", "only the real tokens"),
        (lambda *a, **k: _head(*a, **k, by_length=True), "hint", "attention_mask.sum(1)"),
        (lambda *a, **k: _head(*a, **k, last=True), "hint", "first token"),
        (lambda *a, **k: _head(*a, **k, probabilities=True), "hint", "return logits"),
    ],
    "layerwise_lr_groups": [
        (lambda m, b, d: _groups(m, b, d, upwards=True), "hint", "the decay goes downwards"),
        (lambda m, b, d: _groups(m, b, d, embeddings_like_layer0=True), "hint", "below layer 0"),
        (lambda m, b, d: _groups(m, b, d, head_decayed=True), "hint", "the head (pooler and classifier) is new"),
        (lambda m, b, d: _groups(m, b, d, same=True), "hint", "same rate"),
        (lambda m, b, d: _groups(m, b, d, forget_pooler=True), "message", "in no group"),
        (lambda m, b, d: _groups(m, b, d, pooler_twice=True), "message", "in two groups"),
    ],
}


def test_the_groups_train_the_tiny_bert_with_adamw():
    model = finetune._tiny_bert(2, 0)
    optimizer = torch.optim.AdamW(REFERENCE["layerwise_lr_groups"](model, 1e-3, 0.5))
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert lrs == [1e-3 * 0.5 ** 3, 1e-3 * 0.5 ** 2, 1e-3 * 0.5, 1e-3]
    loss = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([1])).loss
    loss.backward()
    optimizer.step()


globals().update(checker_tests(NAMES, CHECKERS, REFERENCE, STUBS, WRONG, {SOLUTION: NAMES, STUDENT: NAMES}))
globals().update(notebook_tests(CHAPTER, NAMES, ("pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)", "lr = base_lr * decay ** (L - layer)"),
                                "97a_checks_finetune", TIMEOUT))
