"""Tests of ptm_course.text (chapter 5): the masked-LM loss against transformers, the data, the FLOP formula
against PyTorch's own counter, a short pretraining saved and reloaded offline, and two processes under torchrun."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM

from ptm_course import text as T
from ptm_course.data import DeviceLoader, load_tokenizer
from ptm_course.objectives import IGNORE_INDEX, mask_tokens
from ptm_course.train import resolve_mixed_precision

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tiny_config(tokenizer, block=32):
    return T.small_bert_config(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=block)


def test_masked_lm_loss_equals_bert_for_masked_lm_with_padding(tokenizer):
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config(tokenizer)).eval()
    batch = tokenizer(["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever, and rich, with a comfortable home."],
                      return_tensors="pt", padding=True)
    inputs, labels = mask_tokens(batch.input_ids, tokenizer, mlm_probability=0.4, generator=torch.Generator().manual_seed(1))
    assert (labels != IGNORE_INDEX).any() and (batch.attention_mask == 0).any()
    with torch.no_grad():
        theirs = model(input_ids=inputs, attention_mask=batch.attention_mask, labels=labels).loss
        ours = T.MaskedLMLoss(model)(inputs, labels, batch.attention_mask)
        logits, target = T.MaskedLMLoss(model).predict(inputs, labels, batch.attention_mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert logits.shape == (int((labels != IGNORE_INDEX).sum()), len(tokenizer)) and torch.equal(target, labels[labels != IGNORE_INDEX])
    nothing = torch.full_like(labels, IGNORE_INDEX)  # no target at all: a zero loss that backpropagates
    zero = T.MaskedLMLoss(model)(inputs, nothing)
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="labels has shape"):
        T.MaskedLMLoss(model)(inputs, labels[:, 1:])


def test_blocks_and_the_held_out_novel(tokenizer):
    blocks = T.make_blocks(torch.arange(100, 117), tokenizer, block_size=7)
    assert blocks.shape == (3, 7) and blocks[:, 1:-1].flatten().tolist() == list(range(100, 115))
    assert (blocks[:, 0] == tokenizer.cls_token_id).all() and (blocks[:, -1] == tokenizer.sep_token_id).all()
    with pytest.raises(ValueError, match="1-D"):
        T.make_blocks(torch.zeros(2, 5, dtype=torch.long), tokenizer)
    ids = T.tokenize_novels(tokenizer)
    assert len(ids) == 6 and all(len(v) > 90_000 for v in ids.values()) and sum(map(len, ids.values())) > 900_000
    data = T.austen_mlm_data(tokenizer, block_size=64, valid_novel="Emma")
    assert len(data["train_ids"]) == sum(len(v) for k, v in ids.items() if k != "Emma")
    assert len(data["valid"]) == len(ids["Emma"])//62
    emma = ids["Emma"][:62]
    assert torch.equal(data["valid"][0, 1:-1], emma)
    assert not any(torch.equal(row[1:-1], emma) for row in data["train"])  # the held-out text is not trained on
    with pytest.raises(ValueError, match="Unknown novel"):
        T.austen_mlm_data(tokenizer, valid_novel="Ulysses")


def test_unigram_and_evaluation(tokenizer):
    lp = T.unigram_log_probs(torch.tensor([5, 5, 5, 7]), vocab_size=10)
    assert torch.allclose(lp.exp().sum(), torch.tensor(1.0)) and math.isclose(lp[5].exp().item(), 4/14, rel_tol=1e-6)
    data = T.austen_mlm_data(tokenizer, block_size=32, limit_blocks=64)
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config(tokenizer))
    loader = DeviceLoader(data["valid"], batch_size=4, shuffle=False)
    uni = T.unigram_log_probs(data["train_ids"], len(tokenizer))
    a = T.evaluate_mlm(model, loader, tokenizer, uni)
    assert a == T.evaluate_mlm(T.MaskedLMLoss(model), loader, tokenizer, uni)  # fixed masks; wrapped or not
    assert abs(a["mlm_val_loss"] - math.log(len(tokenizer))) < 1.0 and 0 <= a["masked_accuracy"] < 0.01
    assert 4 < a["unigram_val_loss"] < a["mlm_val_loss"]
    assert model.training  # evaluation leaves the mode as it found it


def test_flop_formula_matches_pytorchs_counter(tokenizer):
    from torch.utils.flop_counter import FlopCounterMode
    cfg = T.small_bert_config(tokenizer, hidden_size=64, num_hidden_layers=3, num_attention_heads=2)
    model = T.MaskedLMLoss(BertForMaskedLM(cfg))
    ids = torch.randint(1000, 20000, (3, 48))
    inputs, labels = mask_tokens(ids, tokenizer, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(inputs, labels).backward()
    fraction = (labels != IGNORE_INDEX).float().mean().item()
    formula = T.training_flops_per_token(cfg, 48, head_fraction=fraction)*ids.numel()
    assert abs(counter.get_total_flops()/formula - 1) < 0.05, (counter.get_total_flops(), formula)


def test_pretraining_learns_and_saves_a_folder_that_reloads_offline(tokenizer, tmp_path):
    cfg = tiny_config(tokenizer)
    data = T.austen_mlm_data(tokenizer, block_size=32, limit_blocks=256)
    model, history, info = T.pretrain_bert(tmp_path/"bert", tokenizer=tokenizer, config=cfg, data=data, block_size=32,
                                           batch_size=16, steps=40, lr=3e-3, evaluations=2, device="cpu", desc="test")
    first, last = history.rows[0]["loss"], sum(r["loss"] for r in history.rows[-5:])/5
    assert first > 9.5 and last < first - 1.5, (first, last)  # from ~ln(30,522) towards word frequencies
    assert info["mlm_val_loss"] < 9.6 and info["steps"] == 40 and info["tokens"] == 40*16*32
    assert info["parameter_digests"] == [T.parameter_digest(model)]
    assert info["precision"] == resolve_mixed_precision("native", "cpu")  # the default: bf16 where the CPU computes in it
    saved = json.loads((tmp_path/"bert"/"pretraining.json").read_text())
    assert saved["mlm_val_loss"] == info["mlm_val_loss"] and len(saved["history"]) == 40
    reloaded = BertForMaskedLM.from_pretrained(tmp_path/"bert", local_files_only=True).eval()
    assert T.parameter_digest(reloaded) == T.parameter_digest(model)
    guesses = T.fill_mask(tmp_path/"bert", "She was [MASK] to go.", k=3, device="cpu")
    assert len(guesses) == 3 and all(0 <= p <= 1 for _, p in guesses)
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        T.fill_mask(tmp_path/"bert", "no blank here", device="cpu")


def test_tokens_per_second_after_a_resume_counts_only_the_steps_run(tokenizer, tmp_path):
    import shutil
    cfg = tiny_config(tokenizer)
    data = T.austen_mlm_data(tokenizer, block_size=32, limit_blocks=128)
    kw = dict(tokenizer=tokenizer, config=cfg, data=data, block_size=32, batch_size=16, steps=20, evaluations=1, device="cpu",
              checkpoint_dir=tmp_path/"ckpt", checkpoint_every=10, desc="test")
    _, _, first = T.pretrain_bert(**kw)
    assert "resumed_from_step" not in first and first["tokens_per_s"] == pytest.approx(20*16*32/first["seconds"])
    shutil.rmtree(tmp_path/"ckpt"/"step-00000020")  # as if interrupted after step 10's checkpoint
    _, _, resumed = T.pretrain_bert(**kw, resume=True)
    assert resumed["resumed_from_step"] == 10 and resumed["steps"] == 20
    assert resumed["tokens_per_s"] == pytest.approx(10*16*32/resumed["seconds"])  # 10 steps ran here, not 20


def test_parameter_digest_sees_any_change(tokenizer):
    model = BertForMaskedLM(tiny_config(tokenizer))
    d = T.parameter_digest(model)
    with torch.no_grad(): model.bert.encoder.layer[1].output.dense.bias[3] += 1e-6
    assert T.parameter_digest(model) != d


def run(cmd, env, timeout=600):
    "Run `cmd` in its own process group; on timeout kill the group (torchrun's workers too)."
    import signal
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT)
    try: out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL); out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])}... did not finish in {timeout} s. Output:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-5000:]
    return out


def test_pretrain_bert_command_on_two_processes_matches_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    common = ["pretrain-bert", "--steps", "8", "--limit-blocks", "128", "--block-size", "32", "--hidden-size", "32", "--layers", "2",
              "--heads", "2", "--device", "cpu", "--lr", "2e-3"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(port), "-m", "ptm_course.cli", *common, "--batch-size", "4", "--output", str(tmp_path/"two")], env)
    one = run([sys.executable, "-m", "ptm_course.cli", *common, "--batch-size", "8", "--output", str(tmp_path/"one")], env)
    info2, info1 = (json.loads(out.strip().splitlines()[-1]) for out in (two, one))
    assert info2["processes"] == 2 and info1["processes"] == 1
    assert len(info2["parameter_digests"]) == 2 and len(set(info2["parameter_digests"])) == 1  # the ranks stayed identical
    assert info2["tokens"] == info1["tokens"] == 8*8*32  # the same global batch
    h2 = json.loads((tmp_path/"two"/"pretraining.json").read_text())["history"]
    h1 = json.loads((tmp_path/"one"/"pretraining.json").read_text())["history"]
    assert len(h2) == len(h1) == 8
    # the same data, initial weights and global batch; only the random masks differ, so the losses agree within noise
    assert abs(h2[0]["loss"] - h1[0]["loss"]) < 0.1, (h2[0]["loss"], h1[0]["loss"])
    assert abs(sum(r["loss"] for r in h2)/8 - sum(r["loss"] for r in h1)/8) < 0.1
    assert abs(info2["mlm_val_loss"] - info1["mlm_val_loss"]) < 0.1
    reloaded = BertForMaskedLM.from_pretrained(tmp_path/"two", local_files_only=True)
    assert T.parameter_digest(reloaded) == info2["parameter_digests"][0]
