"""Tests of ptm_course.finetune (chapter 6): batches, the three starts, fine-tuning, saving and `classify`."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from ptm_course import finetune as FT
from ptm_course import text as T
from ptm_course.data import Review, load_tokenizer, review_splits
from ptm_course.train import resolve_mixed_precision


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_bert(tokenizer, tmp_path_factory):
    "A tiny BERT 'pretrained' for a few steps, saved like chapter 5's folder."
    folder = tmp_path_factory.mktemp("bert")/"tiny"
    cfg = T.small_bert_config(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
    data = T.austen_mlm_data(tokenizer, block_size=64, limit_blocks=32)
    T.pretrain_bert(folder, tokenizer=tokenizer, config=cfg, data=data, block_size=64, batch_size=8, steps=3, device="cpu", desc="test")
    return folder


@pytest.fixture(scope="module")
def small_splits():
    s = review_splits(seed=0)
    return {"train": s["train"][:96], "validation": s["validation"][:48], "test": s["test"][:64]}


def test_batches_are_padded_per_batch_and_grouped_by_length(tokenizer, small_splits):
    enc = FT.encode_reviews(small_splits["train"], tokenizer, max_length=16)
    assert all(len(e["input_ids"]) <= 16 for e in enc) and {e["labels"] for e in enc} <= {0, 1}
    assert [e["labels"] for e in enc] == [r.label for r in small_splits["train"]]
    batches = list(FT.review_loader(enc, tokenizer, batch_size=8, seed=1))
    assert sum(len(b["labels"]) for b in batches) == len(enc)
    for b in batches:
        assert b["input_ids"].shape == b["attention_mask"].shape and b["attention_mask"][:, 0].all()
        assert b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]  # padded to its own longest review only
    ordered = list(FT.review_loader(enc, tokenizer, batch_size=8, shuffle=False))
    assert torch.equal(ordered[0]["labels"], torch.tensor([e["labels"] for e in enc[:8]]))
    with pytest.raises(ValueError, match="empty"):
        FT.review_loader([], tokenizer)


def test_three_starts(tiny_bert):
    from transformers import BertForMaskedLM
    mlm = BertForMaskedLM.from_pretrained(tiny_bert, local_files_only=True)
    pre = FT.classifier_from("small_pretrained", seed=0, small_bert=tiny_bert)
    scratch = FT.classifier_from("small_scratch", seed=0, small_bert=tiny_bert)
    q = lambda m: m.bert.encoder.layer[1].attention.self.query.weight
    assert torch.equal(q(pre), q(mlm)) and not torch.equal(q(scratch), q(mlm))
    assert pre.config.id2label == {0: "rotten", 1: "fresh"} and pre.classifier.out_features == 2
    assert sum(p.numel() for p in pre.parameters()) == sum(p.numel() for p in scratch.parameters())
    again = FT.classifier_from("small_pretrained", seed=0, small_bert=tiny_bert)
    assert torch.equal(again.classifier.weight, pre.classifier.weight)  # the new head depends on the seed only
    assert not torch.equal(FT.classifier_from("small_pretrained", seed=1, small_bert=tiny_bert).classifier.weight, pre.classifier.weight)
    assert type(pre) is type(scratch) is BertForSequenceClassification  # the small networks' head chosen on validation: [CLS]
    minilm = FT.classifier_from("minilm")
    assert isinstance(minilm, FT.MeanPooledBertForSequenceClassification) and minilm.config.hidden_size == 384
    assert not hasattr(minilm.bert, "pooler") or minilm.bert.pooler is None  # the mean-pooled head has no pooler
    seed_head = FT.classifier_from("minilm", pooling="cls")
    assert type(seed_head) is BertForSequenceClassification
    assert torch.equal(q(seed_head), q(minilm))  # the same pretrained encoder under either head
    assert type(FT.classifier_from("small_scratch", small_bert=tiny_bert, pooling="mean")) is FT.MeanPooledBertForSequenceClassification
    with pytest.raises(ValueError, match="pooling must be one of"):
        FT.classifier_from("minilm", pooling="max")


def test_mean_pooled_head_reads_only_the_real_tokens(tiny_bert, tokenizer):
    "The logits come from the masked mean of the encoder's last hidden states: padding changes nothing, and a wrong mask is refused."
    from ptm_course.checks.bert import check_mean_pooling
    check_mean_pooling(FT.mean_pool)  # the library passes the pooling exercise's checker
    model = FT.classifier_from("small_pretrained", small_bert=tiny_bert, pooling="mean").eval()
    enc = tokenizer(["a fine film", "a much longer and rather duller film than that"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
        hidden = model.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        real = enc["attention_mask"].bool()
        by_hand = torch.stack([model.classifier(h[m].mean(0)) for h, m in zip(hidden, real)])
        alone = model(**tokenizer(["a fine film"], return_tensors="pt")).logits
    torch.testing.assert_close(logits, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:1], alone, atol=1e-5, rtol=1e-5)  # padded in a batch or alone: the same logits
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"][:, 1:])
    with pytest.raises(ValueError, match="attention_mask"):
        FT.mean_pool(hidden, enc["attention_mask"][:1])


def test_mean_pooled_head_exports_to_onnx(tiny_bert, tokenizer, tmp_path):
    from ptm_course import compress as C
    model = FT.classifier_from("small_pretrained", small_bert=tiny_bert, pooling="mean").eval()
    path = C.export_text_onnx(model, tokenizer, tmp_path/"mean.onnx")
    batches = C.review_batches(["short", "a much longer review than any example the export saw, with many words", "ok"], tokenizer, batch_size=2)
    torch.testing.assert_close(C.text_logits_onnx(C.ort_session(path), batches), C.text_logits_torch(model, batches), atol=1e-4, rtol=1e-4)


def test_final_fit_trains_on_training_and_validation(tokenizer, tiny_bert, small_splits):
    model = FT.classifier_from("small_scratch", small_bert=tiny_bert)
    history, results = FT.finetune_classifier(model, tokenizer, small_splits, lr=1e-3, epochs=1, batch_size=16, seed=0, device="cpu",
                                              desc="test", train_on=FT.FINAL_FIT, mixed_precision="no")
    assert results["train_reviews"] == 96 + 48 and results["steps"] == 9 and results["trained_on"] == ["train", "validation"]
    assert results["valid_accuracy"] is None and not any("accuracy" in r for r in history.rows)  # no accuracy on reviews it trained on
    assert 0 <= results["test_accuracy"] <= 1
    for bad in (("train", "test"), (), ("validation",)):
        with pytest.raises(ValueError, match="train_on"):
            FT.finetune_classifier(model, tokenizer, small_splits, train_on=bad)


def test_finetune_save_reload_and_classify(tokenizer, tiny_bert, small_splits, tmp_path):
    model = FT.classifier_from("small_pretrained", small_bert=tiny_bert, pooling="mean")
    history, results = FT.finetune_classifier(model, tokenizer, small_splits, lr=1e-3, epochs=2, batch_size=16, seed=0,
                                              device="cpu", output_dir=tmp_path/"clf", desc="test")
    assert results["steps"] == 2*6 and len(history) == 12 and "accuracy" in history.rows[5] and "accuracy" in history.rows[-1]
    assert 0 <= results["test_accuracy"] <= 1 and results["parameters"] == T.count_parameters(model)
    assert results["precision"] == resolve_mixed_precision("native", "cpu")  # bf16 where this CPU computes in it, else float32
    saved = json.loads((tmp_path/"clf"/"finetuning.json").read_text())
    assert saved["test_accuracy"] == results["test_accuracy"]
    texts = [r.text for r in small_splits["test"]]
    out = FT.classify(texts, tmp_path/"clf", device="cpu", batch_size=7)
    assert len(out) == len(texts)
    for r in out:
        assert r["label"] in ("rotten", "fresh") and r["label_id"] == ("rotten", "fresh").index(r["label"])
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5 and r["probabilities"][r["label"]] >= 0.5
    acc = sum(r["label_id"] == rev.label for r, rev in zip(out, small_splits["test"]))/len(texts)
    assert abs(acc - results["test_accuracy"]) < 1e-9  # the reloaded folder gives the accuracy measured after training
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path/"clf", local_files_only=True).eval()
    assert type(reloaded) is FT.MeanPooledBertForSequenceClassification and reloaded.config.model_type == "mean_pooled_bert"
    enc = tokenizer(texts[0], return_tensors="pt")
    with torch.no_grad(): seed_style = reloaded(**enc).logits.argmax(dim=1).item()  # the seed's inference snippet
    assert seed_style == out[0]["label_id"]
    assert FT.classify("a single string works too", tmp_path/"clf", device="cpu")[0]["label"] in ("rotten", "fresh")


def test_classify_rejects_bad_input(tmp_path, tiny_bert):
    with pytest.raises(FileNotFoundError, match="No fine-tuned model"):
        FT.classify(["fine"], tmp_path/"nothing-here")
    folder = tmp_path/"clf"
    FT.save_classifier(FT.classifier_from("small_scratch", small_bert=tiny_bert), load_tokenizer(), folder)
    with pytest.raises(ValueError, match="empty"):
        FT.classify(["good", "   "], folder)
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        FT.classify(["good", 3], folder)
    assert FT.classify([], folder) == []


def test_finetune_needs_all_three_splits(tokenizer, tiny_bert, small_splits):
    with pytest.raises(ValueError, match="missing"):
        FT.finetune_classifier(FT.classifier_from("small_scratch", small_bert=tiny_bert), tokenizer, {"train": small_splits["train"]})


def test_comparison_table():
    fake = {("a", 0): (None, dict(test_accuracy=0.8, seconds=10, tokens_per_s=100, parameters=5)),
            ("a", 1): (None, dict(test_accuracy=0.9, seconds=20, tokens_per_s=300, parameters=5)),
            ("b", 0): (None, dict(test_accuracy=0.5, seconds=1, tokens_per_s=10, parameters=2))}
    rows = FT.comparison_table(fake, {"a": "start A"})
    assert [r["start"] for r in rows] == ["a", "b"] and rows[0]["name"] == "start A"
    assert abs(rows[0]["accuracy"] - 0.85) < 1e-12 and abs(rows[0]["std"] - 0.0707106781) < 1e-6 and rows[1]["std"] == 0.0
    assert "| start A | 85.0 ± 7.1 % |" in FT.format_comparison(rows)


def test_finetune_sweep_script_runs_and_logs(tiny_bert, tmp_path, capsys):
    "scripts/finetune_sweep.py (the chapter's recipe diagnostics): one short run per variant, each logged as one JSON line."
    import runpy
    script = runpy.run_path(str(Path(__file__).resolve().parents[1]/"scripts"/"finetune_sweep.py"))
    main = script["main"]
    log = tmp_path/"sweep.jsonl"
    common = ["--start", "small_pretrained", "--small", str(tiny_bert), "--train-subset", "64", "--epochs", "1", "--lr", "1e-3",
              "--mixed-precision", "no", "--log", str(log)]
    for extra in ([], ["--pool", "mean", "--llrd", "0.8", "--head-lr", "1e-2", "--refresh-unread"], ["--train-on-validation"]):
        main([*common, *extra])
    rows = [json.loads(l) for l in log.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["pool"] == "pooler" and rows[1]["pool"] == "mean" and rows[1]["refresh_unread"] and rows[2]["train_on_validation"]
    assert not {"log", "summarize"} & set(rows[0])  # the recipe and its results, not where they were written
    for r in rows:
        assert len(r["per_epoch"]) == 1 and 0 < r["per_epoch"][0]["test"] < 1
    assert all(0 < r["per_epoch"][0]["valid"] < 1 for r in rows[:2]) and rows[2]["per_epoch"][0]["valid"] is None  # seen reviews
    main([*common, "--seed", "1"])  # a second seed of the first recipe: grouped with it, not a recipe of its own
    groups = script["summarize"](log)
    assert [g["seeds"] for g in groups] == [[0, 1], [0], [0]]
    tests = [100*json.loads(l)["per_epoch"][-1]["test"] for l in log.read_text().splitlines()]
    assert groups[0]["test"] == pytest.approx((tests[0] + tests[3])/2, abs=0.01) and groups[2]["valid"] is None
    main(["--summarize", str(log)])
    assert "train_on_validation=True" in capsys.readouterr().out


def test_course_splits_and_recipes_cut_only_in_fast_mode(monkeypatch):
    full = review_splits(seed=0)
    monkeypatch.delenv("PTM_FAST", raising=False)
    assert {k: len(v) for k, v in FT.course_splits().items()} == {k: len(v) for k, v in full.items()}
    assert all(FT.course_recipe(s) == FT.RECIPES[s] for s in FT.RECIPES)
    monkeypatch.setenv("PTM_FAST", "1")
    fast = FT.course_splits()
    assert {k: len(v) for k, v in fast.items()} == {"train": 256, "validation": 128, "test": 128}
    assert all(fast[k] == full[k][:len(fast[k])] for k in full)  # a prefix of the same split, not another one
    assert all(FT.course_recipe(s) == dict(FT.RECIPES[s], epochs=1) for s in FT.RECIPES)
