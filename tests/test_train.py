"""Tests of `ptm_course.train`: learning, evaluation, checkpoints, bit-exact resume, errors, two processes."""
import json
import os
import signal
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ptm_course.core import seed_everything
from ptm_course.data import DeviceLoader
from ptm_course.train import (CheckpointError, History, default_mixed_precision, latest_checkpoint, load_weights, native_bf16,
                              read_checkpoint_state, resolve_mixed_precision, train)


def make_data(n=384, d=12, classes=3):
    "A small, learnable classification problem (always the same data)."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(1)
    return x, y


def make_run(seed=0, dropout=0.1, batch_size=32):
    "Model (with dropout, so resume must restore the RNG), Adam, a scheduler and shuffled loaders."
    x, y = make_data()
    seed_everything(seed)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    train_loader = DeviceLoader(x[:320], y[:320], batch_size=batch_size, generator=torch.Generator().manual_seed(1))
    eval_loader = DeviceLoader(x[320:], y[320:], batch_size=64, shuffle=False)
    return model, opt, sched, train_loader, eval_loader


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def accuracy(model, loader):
    right = total = 0
    for x, y in loader:
        right += (model(x).argmax(1) == y).sum().item(); total += len(y)
    return {"accuracy": right/total}


def params(model): return [p.detach().clone() for p in model.parameters()]
def same(a, b): return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def test_training_decreases_the_loss():
    model, opt, _, tl, _ = make_run(dropout=0.0)
    history = train(model, opt, tl, loss_fn, epochs=4, device="cpu")
    assert len(history) == 4*len(tl) and [r["step"] for r in history] == list(range(1, len(history) + 1))
    losses = [r["loss"] for r in history]
    assert sum(losses[-5:])/5 < 0.5*sum(losses[:5])/5
    assert history.rows[-1]["epoch"] == 4.0 and history.rows[0]["lr"] == 1e-2


def test_eval_metrics_land_in_history():
    model, opt, sched, tl, el = make_run()
    h = train(model, opt, tl, loss_fn, epochs=2, scheduler=sched, eval_loader=el, eval_fn=accuracy, eval_every=6, device="cpu")
    evaluated = [r["step"] for r in h if "accuracy" in r]
    assert evaluated == [6, 12, 18, 20]  # every 6 steps and at the end
    assert 0.5 < h.last("accuracy") <= 1
    assert h.rows[-1]["lr"] == pytest.approx(1e-2*0.7**2)  # StepLR stepped once per step: 19 steps before the last
    # no eval_fn: the mean of loss_fn over the eval batches
    model, opt, _, tl, el = make_run()
    h = train(model, opt, tl, loss_fn, max_steps=5, eval_loader=el, device="cpu")
    assert [r["step"] for r in h if "val_loss" in r] == [5] and h.last("val_loss") > 0
    fig = h.plot()
    assert len(fig.axes) == 1 and fig.axes[0].get_legend() is not None


def test_eval_fn_gets_a_dataloader_moved_to_the_device_with_its_attributes():
    x, y = make_data()
    eval_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[320:], y[320:]), batch_size=50)
    def eval_fn(model, loader):
        right = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in loader)
        return {"accuracy": right/len(loader.dataset), "batches": torch.tensor(len(loader))}
    model, opt, _, tl, _ = make_run()
    h = train(model, opt, tl, loss_fn, max_steps=3, eval_loader=eval_loader, eval_fn=eval_fn, device="cpu")
    assert h.last("batches") == 2.0 and 0 <= h.last("accuracy") <= 1
    with pytest.raises(ValueError, match="'loss'.*val_loss"):
        train(model, opt, tl, loss_fn, max_steps=1, eval_loader=eval_loader, eval_fn=lambda m, l: {"loss": 1.0}, device="cpu")


@pytest.mark.parametrize("how", ["exception", "max_steps"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, how):
    common = dict(epochs=3, eval_every=4, eval_fn=accuracy, device="cpu")
    model, opt, sched, tl, el = make_run()
    reference = train(model, opt, tl, loss_fn, scheduler=sched, eval_loader=el, **common)
    expected = params(model)

    model, opt, sched, tl, el = make_run()
    if how == "exception":  # Ctrl-C at step 17, mid-epoch; the latest checkpoint is step 15
        calls = []
        def interrupted(model, batch):
            calls.append(1)
            if len(calls) == 17: raise KeyboardInterrupt
            return loss_fn(model, batch)
        with pytest.raises(KeyboardInterrupt):
            train(model, opt, tl, interrupted, scheduler=sched, eval_loader=el, checkpoint_dir=tmp_path, checkpoint_every=5, **common)
        assert latest_checkpoint(tmp_path).name == "step-00000015"
    else:  # a run cut short at step 13, then continued with the full budget
        train(model, opt, tl, loss_fn, scheduler=sched, eval_loader=el, checkpoint_dir=tmp_path, max_steps=13, **common)
        assert latest_checkpoint(tmp_path).name == "step-00000013"
    assert not same(params(model), expected)

    model, opt, sched, tl, el = make_run(seed=123)  # another initialization: resume must overwrite everything
    resumed = train(model, opt, tl, loss_fn, scheduler=sched, eval_loader=el, checkpoint_dir=tmp_path, resume=True, **common)
    assert same(params(model), expected)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert resumed.last("accuracy") == reference.last("accuracy")
    assert latest_checkpoint(tmp_path).name == "step-00000030"

    # resuming a finished run trains nothing and gives back its weights and history
    model, opt, sched, tl, el = make_run(seed=7)
    again = train(model, opt, tl, loss_fn, scheduler=sched, eval_loader=el, checkpoint_dir=tmp_path, resume=True, **common)
    assert same(params(model), expected) and again.rows == resumed.rows


def test_resume_with_a_torch_dataloader(tmp_path):
    "A DataLoader shuffled from the global generator, dropout from the global generator too."
    x, y = make_data()
    def run(seed, **kw):
        seed_everything(seed)
        model = nn.Sequential(nn.Linear(12, 16), nn.Dropout(0.2), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        seed_everything(0)  # the data order: the same in every run
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=48, shuffle=True)
        train(model, opt, loader, loss_fn, epochs=2, device="cpu", **kw)
        return params(model)
    expected = run(0)
    run(0, max_steps=11, checkpoint_dir=tmp_path)
    assert same(run(5, checkpoint_dir=tmp_path, resume=True), expected)


def test_checkpoint_files_are_safetensors_and_safe_loads(tmp_path):
    model, opt, sched, tl, _ = make_run()
    train(model, opt, tl, loss_fn, max_steps=12, scheduler=sched, checkpoint_dir=tmp_path, checkpoint_every=4,
          keep_checkpoints=2, device="cpu")
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-00000008", "step-00000012"]  # the 2 newest kept
    ckpt = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt", "state.json"]
    weights = load_file(ckpt/"model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"): torch.load(ckpt/name, weights_only=True)
    state = json.loads((ckpt/"state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["steps_per_epoch"]) == (12, 1, 2, 10)
    assert len(state["history"]) == 12 and set(state["files"]) == {"model.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt"}
    fresh = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 3))
    load_weights(fresh, tmp_path)  # the latest checkpoint of a checkpoint_dir
    assert same(params(fresh), params(model))
    # starting afresh on top of an earlier run's checkpoints is refused, not silently mixed
    with pytest.raises(FileExistsError, match="resume=True"):
        train(model, opt, tl, loss_fn, max_steps=2, checkpoint_dir=tmp_path, device="cpu")


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "rng.pt", "state.json"])
def test_a_corrupt_checkpoint_file_is_named(tmp_path, victim):
    model, opt, _, tl, _ = make_run()
    train(model, opt, tl, loss_fn, max_steps=3, checkpoint_dir=tmp_path, device="cpu")
    path = latest_checkpoint(tmp_path)/victim
    data = bytearray(path.read_bytes())
    data[len(data)//2] ^= 0xFF
    path.write_bytes(bytes(data))
    model, opt, _, tl, _ = make_run()
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        train(model, opt, tl, loss_fn, max_steps=6, checkpoint_dir=tmp_path, resume=True, device="cpu")


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    model, opt, _, tl, _ = make_run()
    train(model, opt, tl, loss_fn, max_steps=2, checkpoint_dir=tmp_path, device="cpu")
    with pytest.raises(CheckpointError, match="model.safetensors.*does not fit"):
        load_weights(nn.Linear(12, 3), tmp_path)
    with pytest.raises(CheckpointError, match="No checkpoint found"):
        load_weights(nn.Linear(12, 3), tmp_path/"nothing-here")


def test_clear_errors_on_bad_input(tmp_path):
    model, opt, _, tl, _ = make_run()
    with pytest.raises(ValueError, match=r"scalar.*step 1.*shape \(32,\)"):
        train(model, opt, tl, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), device="cpu")
    def nan_at_3(m, b, calls=[]):
        calls.append(1)
        loss = loss_fn(m, b)
        return loss*float("nan") if len(calls) == 3 else loss
    before = params(model)
    with pytest.raises(FloatingPointError, match="nan at step 3"):
        train(model, opt, tl, nan_at_3, device="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters()) and not same(before, params(model))
    with pytest.raises(ValueError, match="empty"):
        train(model, opt, DeviceLoader(torch.zeros(5, 12), torch.zeros(5).long(), batch_size=8, drop_last=True), loss_fn, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        train(model, opt, [], loss_fn, device="cpu")
    with pytest.raises(ValueError, match="requires_grad"):
        train(model, opt, tl, lambda m, b: loss_fn(m, b).detach(), device="cpu")
    with pytest.raises(ValueError, match="eval_loader"):
        train(model, opt, tl, loss_fn, eval_fn=accuracy, device="cpu")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(model, opt, tl, loss_fn, resume=True, device="cpu")
    # the model comes back without Accelerate's autocast wrapper, after an error too
    assert "_original_forward" not in model.__dict__ and "forward" not in model.__dict__


def test_a_stream_without_len_and_a_list_of_cpu_batches():
    class Stream:  # re-iterable, no len(): epochs end when it runs out
        def __init__(self, batches): self.batches = batches
        def __iter__(self): return iter(self.batches)
    model, opt, _, tl, _ = make_run()
    batches = list(tl)
    h = train(model, opt, Stream(batches), loss_fn, epochs=2, device="cpu")
    assert len(h) == 2*len(batches) and h.rows[-1]["epoch"] == 1  # the pass in progress, counted from 0
    h = train(model, opt, batches, loss_fn, epochs=None, max_steps=25, device="cpu")
    assert len(h) == 25


def test_bf16_autocast_on_the_cpu_and_the_model_given_back_plain():
    model, opt, _, tl, _ = make_run(dropout=0.0)
    seen = []
    hook = model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    h = train(model, opt, tl, loss_fn, max_steps=20, mixed_precision="bf16", device="cpu")
    hook.remove()
    assert set(seen) == {torch.bfloat16} and h.rows[-1]["loss"] < h.rows[0]["loss"]
    assert next(model.parameters()).dtype == torch.float32 and "forward" not in model.__dict__
    seen.clear(); model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype)); model(torch.zeros(2, 12))
    assert seen == [torch.float32]  # after training, no autocast left behind
    assert default_mixed_precision("cpu") == "no"
    train(model, opt, tl, loss_fn, max_steps=2, device="cpu")  # another precision in the same process: allowed


def test_native_precision_follows_the_hardware(monkeypatch):
    # 'native' is bf16 exactly where the CPU computes in bf16; the probes are faked both ways
    for has_bf16 in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert native_bf16("cpu") is has_bf16
        assert resolve_mixed_precision("native", "cpu") == ("bf16" if has_bf16 else "no")
        model, opt, _, tl, _ = make_run(dropout=0.0)
        seen = []
        model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        train(model, opt, tl, loss_fn, max_steps=2, mixed_precision="native", device="cpu")
        assert set(seen) == {torch.bfloat16 if has_bf16 else torch.float32}
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert native_bf16("cpu") is False  # a PyTorch without the probe: assume emulated bf16
    assert native_bf16("meta") is False
    assert resolve_mixed_precision(None, "cpu") == resolve_mixed_precision("auto", "cpu") == "no"
    for bad, match in (("half", "mixed_precision must be"), ("fp16", "needs a CUDA GPU")):
        with pytest.raises(ValueError, match=match): resolve_mixed_precision(bad, "cpu")


@pytest.mark.cuda
def test_bf16_autocast_by_default_on_cuda(tmp_path):
    model, opt, _, tl, el = make_run(dropout=0.0)
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    h = train(model, opt, tl, loss_fn, epochs=2, eval_loader=el, checkpoint_dir=tmp_path)  # CPU data, moved per batch
    assert default_mixed_precision("cuda") == "bf16" and torch.bfloat16 in seen
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    assert h.last("loss") < h.rows[0]["loss"] and h.last("val_loss") > 0
    assert load_file(latest_checkpoint(tmp_path)/"model.safetensors")["0.weight"].dtype == torch.float32


TWO_PROCESS_SCRIPT = """
import os, sys, torch, torch.nn.functional as F
from torch import nn
from safetensors.torch import save_file
from ptm_course.core import seed_everything
from ptm_course.data import DeviceLoader
from ptm_course.train import train

out, batch_size = sys.argv[1], int(sys.argv[2])
g = torch.Generator().manual_seed(0)
x = torch.randn(384, 12, generator=g); y = (x @ torch.randn(12, 3, generator=g)).argmax(1)
seed_everything(int(os.environ.get("RANK", 0)))  # a different start per process on purpose: DDP copies process 0's
model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
loader = DeviceLoader(x, y, batch_size=batch_size, generator=torch.Generator().manual_seed(1))
history = train(model, opt, loader, lambda m, b: F.cross_entropy(m(b[0]), b[1]), epochs=2, device="cpu",
                eval_loader=DeviceLoader(x[:128], y[:128], batch_size=64, shuffle=False), eval_every=4,
                checkpoint_dir=os.path.join(out, "checkpoints-" + os.environ.get("WORLD_SIZE", "1")), checkpoint_every=4,
                grad_clip=1.0)
rank = os.environ.get("RANK", "single")
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, f"weights-{rank}.safetensors"))
history.to_json(os.path.join(out, f"history-{rank}.json"))
"""


def run_bounded(cmd, env, timeout, log):
    "Run `cmd` in its own process group with output to `log`; on timeout kill the whole group (torchrun's workers too)."
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try: return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait()
            pytest.fail(f"{' '.join(map(str, cmd[:4]))}... did not finish in {timeout} s; killed with its workers. "
                        f"Output:\n{Path(log).read_text()[-3000:]}")


def test_two_processes_stay_in_sync(tmp_path):
    script = tmp_path/"script.py"
    script.write_text(textwrap.dedent(TWO_PROCESS_SCRIPT))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with socket.socket() as s:  # a free port, so that tests running side by side don't meet
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    two = run_bounded([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                       "--master_port", str(port), str(script), str(tmp_path), "24"], env=env, timeout=300, log=tmp_path/"two.log")
    assert two == 0, (tmp_path/"two.log").read_text()[-6000:]
    one = run_bounded([sys.executable, str(script), str(tmp_path), "48"], env=env, timeout=300, log=tmp_path/"one.log")
    assert one == 0, (tmp_path/"one.log").read_text()[-3000:]
    w0, w1, single = (load_file(tmp_path/f"weights-{r}.safetensors") for r in ("0", "1", "single"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # data parallel: one model, two processes
    # two processes × 24 examples = one process × 48 (the same permutation, the gradients averaged)
    assert all(torch.allclose(w0[k], single[k], atol=1e-5) for k in w0)
    h0, h1 = (History.from_json(tmp_path/f"history-{r}.json") for r in ("0", "1"))
    assert len(h0) == 16 and h0.rows == h1.rows and "val_loss" in h0.rows[-1]
    ckpt = latest_checkpoint(tmp_path/"checkpoints-2")
    state = read_checkpoint_state(ckpt)
    assert ckpt.name == "step-00000016" and state["num_processes"] == 2
    assert len(torch.load(ckpt/"rng.pt", weights_only=True)) == 2  # each process's generators
