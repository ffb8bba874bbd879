"""Chapter 6 diagnostics: fine-tune one start with one recipe on the review split and print the
validation and the test accuracy after every epoch, as one `RESULT {json}` line (appended to `--log`).

The chapter's recipes (`ptm_course.finetune.RECIPES`) are chosen on the *validation* accuracy; the
test accuracy is printed for the record only. The head is the mean of the token vectors (`--pool mean`,
the pooling `all-MiniLM-L6-v2` was trained with) or the seed's pooled `[CLS]` (`--pool pooler`); by
default the one the chapter uses for the start (`ptm_course.finetune.HEADS`).
Variants the chapter does not use are here so that what was tried can be re-run:
layer-wise learning-rate decay (`--llrd`, with its own `--head-lr`); for chapter 5's model, fresh random
embeddings for the token ids its pretraining never read (`--refresh-unread`: masked-LM training with a
tied output layer pushes all of them towards one shared vector); a random subset of the training
reviews (`--train-subset`); and the last step once a recipe is chosen, which the chapter takes, training
on the training and the validation reviews together (`--train-on-validation`: the validation accuracy
is then on seen reviews, and is logged as null).

    python scripts/finetune_sweep.py --start minilm --lr 1e-4 --epochs 2
    python scripts/finetune_sweep.py --start small_pretrained --small ~/.cache/ptm_course/text/<folder> --lr 3e-4 --epochs 3
    python scripts/finetune_sweep.py --summarize results/finetune_sweep_cpu.jsonl   # mean ± std over seeds, per recipe
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from ptm_course.core import seed_everything
from ptm_course.data import load_tokenizer, review_splits
from ptm_course.finetune import MeanPooledBertForSequenceClassification, classifier_from, encode_reviews, evaluate_reviews, review_loader
from ptm_course.text import austen_mlm_data
from ptm_course.train import train


def refresh_unread_embeddings(model, seed: int):
    "Draw new embeddings (N(0, initializer_range), as a network from scratch) for the token ids absent from Austen's training blocks."
    counts = torch.bincount(austen_mlm_data(load_tokenizer())["train"].flatten(), minlength=model.config.vocab_size)
    unread = (counts == 0).nonzero().flatten()
    weight = model.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        weight[unread] = torch.randn(len(unread), weight.shape[1], generator=torch.Generator().manual_seed(seed))*model.config.initializer_range
    print(f"refreshed the embeddings of {len(unread):,} token ids that pretraining never read", flush=True)


def parameter_groups(model, lr: float, llrd: float, head_lr: float | None, weight_decay: float) -> list[dict]:
    "AdamW groups: layer l of L gets lr × llrd^(L − l) (embeddings l = 0, pooler l = L), the head `head_lr`; no decay on vectors."
    layers = model.bert.config.num_hidden_layers
    def lr_of(name):
        if not name.startswith("bert."): return head_lr or lr
        depth = int(name.split(".layer.")[1].split(".")[0]) + 1 if ".layer." in name else 0 if "embeddings" in name else layers
        return lr*llrd**(layers - depth)
    groups = {}
    for name, p in model.named_parameters():
        groups.setdefault((lr_of(name), weight_decay if p.ndim >= 2 else 0.0), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


RECIPE_KEYS = ("start", "small", "lr", "epochs", "batch_size", "pool", "llrd", "head_lr", "weight_decay", "warmup",
               "refresh_unread", "train_subset", "train_on_validation")

def summarize(path) -> list[dict]:
    """The logged runs grouped by recipe (every setting but the seed; the precision is left out too, since "bf16" and
    "native" ran the same bfloat16 on the CPU of the committed runs): seeds, and the last epoch's test and validation
    accuracy in percent, mean and standard deviation over the seeds (None where not measured)."""
    import statistics
    groups = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        groups.setdefault(tuple(str(r.get(k, False if k == "train_on_validation" else None)) for k in RECIPE_KEYS), []).append(r)
    def stats(rs, field):
        xs = [100*r["per_epoch"][-1][field] for r in rs if r["per_epoch"][-1][field] is not None]
        if not xs: return None, None
        return round(statistics.mean(xs), 2), round(statistics.stdev(xs), 2) if len(xs) > 1 else None
    out = []
    for rs in groups.values():
        (test, test_sd), (valid, valid_sd) = stats(rs, "test"), stats(rs, "valid")
        out.append(dict({k: rs[0].get(k) for k in RECIPE_KEYS}, seeds=sorted(r["seed"] for r in rs),
                        test=test, test_std=test_sd, valid=valid, valid_std=valid_sd))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", default="minilm", help="minilm, small_pretrained, small_scratch, or a Hugging Face name or folder")
    p.add_argument("--small", default=None, help="chapter 5's folder for small_pretrained / small_scratch (default: the cached one)")
    p.add_argument("--lr", type=float, default=1e-4); p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0); p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pool", default=None, choices=("mean", "pooler"), help="mean of the token vectors, or the pooled [CLS] (default: the chapter's head for the start)")
    p.add_argument("--llrd", type=float, default=1.0); p.add_argument("--head-lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=0.01); p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--refresh-unread", action="store_true"); p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--train-on-validation", action="store_true", help="train on the training and validation reviews together")
    p.add_argument("--mixed-precision", default="native"); p.add_argument("--log", default=None, help="append the RESULT line here")
    p.add_argument("--summarize", default=None, metavar="JSONL", help="print the runs logged in JSONL, grouped by recipe, and stop")
    a = p.parse_args(argv)
    if a.summarize:
        fmt = lambda m, sd: "    n/a    " if m is None else f"{m:5.2f} ± {sd:4.2f}" if sd is not None else f"{m:5.2f}      "
        print(f"{'start':17s} {'lr':>7} {'ep':>2} {'bs':>3} {'pool':>6} {'llrd':>4} {'other':28s} {'seeds':9s} {'test %':>13} {'valid %':>13}")
        for g in summarize(a.summarize):
            other = ", ".join(f"{k}={g[k]}" for k in ("head_lr", "refresh_unread", "train_subset", "train_on_validation") if g[k])
            print(f"{g['start']:17s} {g['lr']:>7g} {g['epochs']:>2} {g['batch_size']:>3} {g['pool']:>6} {g['llrd']:>4g} {other:28s} "
                  f"{','.join(map(str, g['seeds'])):9s} {fmt(g['test'], g['test_std']):>13} {fmt(g['valid'], g['valid_std']):>13}")
        return
    tokenizer, splits = load_tokenizer(), review_splits(seed=0)
    if a.train_subset:
        reviews = list(splits["train"]); random.Random(0).shuffle(reviews)
        splits = dict(splits, train=reviews[:a.train_subset])
    if a.train_on_validation: splits = dict(splits, train=splits["train"] + splits["validation"])
    model = classifier_from(a.start, seed=a.seed, small_bert=a.small, pooling={"mean": "mean", "pooler": "cls", None: None}[a.pool])
    a.pool = "mean" if isinstance(model, MeanPooledBertForSequenceClassification) else "pooler"  # logged as the head it got
    if a.refresh_unread: refresh_unread_embeddings(model, a.seed)
    enc = {k: encode_reviews(v, tokenizer) for k, v in splits.items()}
    seed_everything(a.seed)
    train_loader = review_loader(enc["train"], tokenizer, a.batch_size, shuffle=True, seed=a.seed)
    valid_loader, test_loader = (review_loader(enc[k], tokenizer, 128, shuffle=False) for k in ("validation", "test"))
    optimizer = torch.optim.AdamW(parameter_groups(model, a.lr, a.llrd, a.head_lr, a.weight_decay))
    steps = a.epochs*len(train_loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, round(a.warmup*steps)), steps)
    def evaluate(m, loader):
        v, t = evaluate_reviews(m, loader), evaluate_reviews(m, test_loader)
        return {"accuracy": v["accuracy"], "val_loss": v["val_loss"], "test_accuracy": t["accuracy"]}
    start = time.perf_counter()
    history = train(model, optimizer, train_loader, lambda m, b: m(**b).loss, epochs=a.epochs, scheduler=scheduler, grad_clip=1.0,
                    eval_loader=valid_loader, eval_fn=evaluate, eval_every=len(train_loader), mixed_precision=a.mixed_precision,
                    desc=f"{a.start} lr {a.lr:g}")
    rows = [r for r in history.rows if "test_accuracy" in r]
    result = dict({k: v for k, v in vars(a).items() if k not in ("log", "summarize")}, train_reviews=len(splits["train"]), seconds=round(time.perf_counter() - start), torch_threads=torch.get_num_threads(),
                  per_epoch=[dict(valid=None if a.train_on_validation else round(r["accuracy"], 4), test=round(r["test_accuracy"], 4))
                             for r in rows])
    line = "RESULT " + json.dumps(result)
    print(line, flush=True)
    if a.log:
        with open(a.log, "a") as f: f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
