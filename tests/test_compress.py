"""Chapter 7 (`ptm_course.compress`): quantization by hand against torch's fake-quantize kernels, pruning against
torch.nn.utils.prune's bookkeeping and an unpruned copy, ONNX export against PyTorch's outputs, distillation's code
path, and `ptm-course bench compress` in fast mode."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from ptm_course import compress as C
from ptm_course.core import accuracy as core_accuracy
from ptm_course.vision import MnistCNN


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


# ---- quantization ----

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quantize_matches_torch_per_tensor_and_per_channel(bits, symmetric, generator):
    x = torch.randn(16, 40, generator=generator)*torch.linspace(0.1, 3, 16)[:, None] + 0.2
    qmin, qmax = C.quant_range(bits, symmetric)
    s, z = C.qparams(x, bits, symmetric)
    theirs = torch.fake_quantize_per_tensor_affine(x, s.item(), int(z), qmin, qmax)
    ours = C.fake_quantize(x, bits, symmetric)
    assert ((ours - theirs).abs() > 1e-6).float().mean() < 1e-2  # only rounding ties may differ (torch multiplies by 1/s)
    sc, zc = C.qparams(x, bits, symmetric, dim=0)
    assert sc.shape == (16,) and zc.shape == (16,)
    theirs_c = torch.fake_quantize_per_channel_affine(x, sc, zc.int(), 0, qmin, qmax)
    assert ((C.fake_quantize(x, bits, symmetric, dim=0) - theirs_c).abs() > 1e-6).float().mean() < 1e-2
    q = C.quantize(x, s, z, bits, symmetric)
    assert q.dtype == torch.int32 and q.min() >= qmin and q.max() <= qmax
    assert (C.dequantize(q, s, z) - x).abs().max() <= s/2*1.0001 + 1e-7  # in range: at most half a step off


def test_zero_is_exact_and_error_halves_per_bit(generator):
    x = torch.rand(1000, generator=generator) + 0.5  # all positive: the range must still be widened to contain 0
    s, z = C.qparams(x)
    assert C.dequantize(torch.tensor(int(z)), s, z) == 0
    errors = [C.quantization_error(torch.randn(200, 200, generator=generator), b) for b in (4, 5, 6, 7, 8)]
    assert all(0.4 < b/a < 0.6 for a, b in zip(errors, errors[1:]))
    assert torch.equal(C.fake_quantize(torch.zeros(4, 4)), torch.zeros(4, 4))  # a constant tensor: no division by zero
    assert C.quantization_error(torch.randn(64, 64, generator=generator)*torch.logspace(-2, 0, 64)[:, None], 4, dim=0) < \
        C.quantization_error(torch.randn(64, 64, generator=generator)*torch.logspace(-2, 0, 64)[:, None], 4)


def test_quantization_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"): C.qparams(torch.randn(3), bits=1)
    with pytest.raises(TypeError, match="float"): C.qparams(torch.arange(3))
    with pytest.raises(ValueError, match="empty"): C.qparams(torch.zeros(0))


def test_quantize_weights_copies_and_rounds_every_layer():
    model = MnistCNN()
    q = C.quantize_weights(model, bits=4)
    assert not torch.equal(q.fc1.weight, model.fc1.weight)
    assert len(torch.unique(q.conv2.weight[0])) <= 16 and len(torch.unique(model.conv2.weight[0])) > 16


# ---- pruning ----

def test_global_and_layer_pruning_reach_their_targets_and_stay_pruned():
    torch.manual_seed(0)
    model = MnistCNN()
    C.prune_by_magnitude(model, 0.5)
    C.prune_by_magnitude(model, 0.9)  # a second call prunes further, to 90 % overall (torch counts what is left)
    assert C.sparsity(model) == pytest.approx(0.9, abs=1e-5)
    assert (model.fc1.weight == 0).float().mean() > (model.conv1.weight == 0).float().mean()  # global: fc1 gives up most
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([1, 2, 3, 4])).backward(); opt.step()
    model(torch.randn(1, 1, 28, 28))
    assert C.sparsity(model) == pytest.approx(0.9, abs=1e-5)  # the masks keep pruned weights at zero through training
    C.remove_pruning(model)
    assert not hasattr(model.fc1, "weight_orig") and C.sparsity(model) == pytest.approx(0.9, abs=1e-5)
    layer = C.prune_by_magnitude(MnistCNN(), 0.75, scope="layer")
    for m, n in C.prunable(layer): assert (getattr(m, n) == 0).float().mean() == pytest.approx(0.75, abs=0.01)
    with pytest.raises(ValueError, match="target"): C.prune_by_magnitude(MnistCNN(), 1.0)
    with pytest.raises(ValueError, match="scope"): C.prune_by_magnitude(MnistCNN(), 0.5, scope="row")


def test_pruning_keeps_the_largest_weights():
    model = MnistCNN()
    w = model.fc2.weight.detach().clone()
    C.prune_by_magnitude(model, 0.5, scope="layer")
    kept = model.fc2.weight != 0
    assert w.abs()[kept].min() >= w.abs()[~kept].max()


def test_pruning_works_on_channels_last_models():
    model = MnistCNN().to(memory_format=torch.channels_last)
    C.prune_by_magnitude(model, 0.5)
    model.to(memory_format=torch.channels_last)
    C.prune_by_magnitude(model, 0.8)
    assert C.sparsity(model) == pytest.approx(0.8, abs=1e-5)


def test_sparse_storage_is_smaller_only_when_sparse():
    model = C.remove_pruning(C.prune_by_magnitude(MnistCNN(), 0.9))
    dense, sparse = C.state_size_mb(model), C.state_size_mb(model, sparse=True)
    assert sparse < dense/3
    assert C.state_size_mb(MnistCNN(), sparse=True) > C.state_size_mb(MnistCNN())  # CSR of a dense matrix costs more


def test_prune_channels_keeping_all_channels_is_the_same_network():
    torch.manual_seed(0)
    model = MnistCNN().eval()
    x = torch.randn(3, 1, 28, 28)
    full = C.prune_channels(model, keep=1.0).eval()
    torch.testing.assert_close(full(x), model(x))
    slim = C.prune_channels(model, keep=0.5).eval()
    assert (slim.conv1.out_channels, slim.conv2.out_channels, slim.fc1.out_features) == (16, 32, 64)
    assert slim(x).shape == (3, 10) and C.count_parameters(slim) < C.count_parameters(model)/3
    with pytest.raises(ValueError, match="keep"): C.prune_channels(model, keep=0)


# ---- ONNX ----

def test_cnn_export_matches_pytorch_and_int8_is_smaller(tmp_path):
    torch.manual_seed(0)
    model = MnistCNN().eval()
    calibration = torch.randn(64, 1, 28, 28)
    paths = C.export_cnn(model, tmp_path, calibration)
    fp32, int8 = C.ort_session(paths["fp32"]), C.ort_session(paths["int8"])
    x = torch.randn(5, 1, 28, 28)  # a batch size the export never saw
    torch.testing.assert_close(C.cnn_logits_onnx(fp32, x), model(x).detach(), atol=1e-4, rtol=1e-4)
    assert C.file_size_mb(paths["fp32"])/C.file_size_mb(paths["int8"]) > 3.5
    assert C.output_loss(model(x).detach(), C.cnn_logits_onnx(int8, x)) < 0.05
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"): C.cnn_logits_onnx(fp32, torch.zeros(2, 28, 28))
    with pytest.raises(FileNotFoundError, match="export"): C.ort_session(tmp_path/"missing.onnx")
    with pytest.raises(ValueError, match="size 2 or more"):
        C.export_onnx(model, {"x": torch.zeros(1, 1, 28, 28)}, tmp_path/"one.onnx", {"x": {0: "batch"}})


def test_text_classifier_export_has_dynamic_batch_and_sequence(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification
    from ptm_course.data import load_tokenizer
    tok = load_tokenizer()
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, num_labels=2)).eval()
    paths = C.export_text_classifier(model, tok, tmp_path)
    batches = C.review_batches(["short", "a much longer review than any example the export saw, with many words in it", "ok"], tok, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    ref = C.text_logits_torch(model, batches)
    torch.testing.assert_close(C.text_logits_onnx(C.ort_session(paths["fp32"]), batches), ref, atol=1e-4, rtol=1e-4)
    int8 = C.text_logits_onnx(C.ort_session(paths["int8"]), batches)
    assert int8.shape == ref.shape and (int8 - ref).abs().max() < 0.5


# ---- criterion, latency, distillation ----

def test_output_loss_is_the_kl_from_the_original(generator):
    a, b = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    assert C.output_loss(a, a) == pytest.approx(0, abs=1e-7)
    manual = (a.softmax(-1)*(a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean().item()
    assert C.output_loss(a, b) == pytest.approx(manual, rel=1e-5)
    with pytest.raises(ValueError, match="shape"): C.output_loss(a, b[:4])
    assert core_accuracy(torch.tensor([[0., 1.], [1., 0.]]), torch.tensor([1, 1])) == 50.0


def test_latency_reports_percentiles():
    r = C.latency_ms(lambda: sum(range(1000)), runs=20, warmup=2)
    assert 0 < r["p50"] <= r["p90"] <= r["p99"] and r["runs"] == 20
    with pytest.raises(ValueError, match="runs"): C.latency_ms(lambda: None, runs=0)


def test_distillation_without_teacher_is_plain_training_and_teacher_changes_it():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 1, 28, 28, generator=g), torch.randint(0, 10, (256,), generator=g)
    teacher = MnistCNN().eval()
    kw = dict(epochs=1, batch_size=64, device="cpu")
    def student():
        torch.manual_seed(1)  # the same initial weights for every student
        return C.mlp_student(16)
    a = C.distill_mnist(student(), None, x, y, **kw)
    b = C.distill_mnist(student(), teacher, x, y, alpha=0.0, **kw)
    c = C.distill_mnist(student(), teacher, x, y, alpha=1.0, **kw)
    torch.testing.assert_close(C.logits_of(a, x), C.logits_of(b, x))
    assert C.output_loss(C.logits_of(teacher, x), C.logits_of(c, x)) < C.output_loss(C.logits_of(teacher, x), C.logits_of(a, x))
    assert C.gap_recovered(98.0, 98.5, 99.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="No gap"): C.gap_recovered(99.0, 99.1, 98.0)


# ---- the benchmark ----

REQUIRED = {"cnn_fp32_acc", "cnn_int8_acc", "cnn_int8_size_ratio", "minilm_fp32_acc", "minilm_int8_acc", "minilm_int8_speedup_b1",
            "cnn_pruned90_acc", "structured_speedup", "kd_gap_recovered", "device"}


def test_bench_compress_fast_mode_prints_json_last(monkeypatch, tmp_path, capsys):
    from ptm_course import bench
    monkeypatch.setenv("PTM_FAST", "1")
    out_file = tmp_path/"compress.json"
    assert bench.bench_cli("compress", json_path=str(out_file), runs=3) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    last = json.loads(lines[-1])
    assert REQUIRED <= set(last) and "rows" not in last
    written = json.loads(out_file.read_text())
    methods = {(r["model"], r["method"]) for r in written["rows"]}
    assert ("MNIST CNN", "int8, ONNX Runtime (static)") in methods and ("MiniLM", "int8, ONNX Runtime (dynamic)") in methods
    for r in written["rows"]:
        assert r["parameters"] > 0 and r["size_mb"] > 0 and r["latency_b1_ms"] > 0 and r["latency_b64_ms"] > 0
        assert 0 <= r["accuracy"] <= 100 and r["output_loss"] >= 0
    assert last["cnn_int8_size_ratio"] > 3.5 and last["minilm_int8_speedup_b1"] > 0
    assert any("| MiniLM | int8, ONNX Runtime (dynamic) |" in l for l in lines)


class _Bag(nn.Module):  # an embedding table big enough to count as one, then a linear layer
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(2000, 16), nn.Linear(16, 3)
    def forward(self, ids): return self.out(self.emb(ids).mean(1))


def test_per_row_int8_embeddings_give_each_row_its_own_scale(tmp_path):
    torch.manual_seed(0)
    model = _Bag().eval()
    with torch.no_grad(): model.emb.weight.mul_(torch.logspace(-2, 1, 2000)[:, None])  # rows of very different ranges
    ids = torch.randint(0, 2000, (4, 7))
    fp32 = C.export_onnx(model, {"ids": ids}, tmp_path/"bag.onnx", {"ids": {0: "batch", 1: "sequence"}})
    rows = C.quantize_embeddings_per_row(fp32, tmp_path/"rows.onnx")
    w = model.emb.weight.detach()
    scale = w.abs().amax(1, keepdim=True)/127
    by_hand = (w/scale).round().clamp(-127, 127)*scale  # symmetric int8, one scale per row
    with torch.no_grad(): want = model.out(by_hand[ids].mean(1))
    got = C.ort_session(rows).run(None, {"ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert C.file_size_mb(rows) < 0.4*C.file_size_mb(fp32)
    # one scale for the whole table (ONNX Runtime's Gather quantizer) loses the small rows
    tensor = C.quantize_onnx_dynamic(fp32, tmp_path/"tensor.onnx", embeddings="per_tensor")
    row = C.quantize_onnx_dynamic(fp32, tmp_path/"row.onnx")
    with torch.no_grad(): exact = model(ids).numpy()
    err = {name: np.abs(C.ort_session(p).run(None, {"ids": ids.numpy()})[0] - exact).max() for name, p in (("tensor", tensor), ("row", row))}
    assert err["row"] < err["tensor"]/3, err
    assert not (tmp_path/"row_rows.onnx").exists()  # the intermediate file is removed


def test_quantize_onnx_dynamic_names_its_choices(tmp_path):
    with pytest.raises(ValueError, match="per_row"): C.quantize_onnx_dynamic(tmp_path/"a.onnx", tmp_path/"b.onnx", embeddings=True)
    cnn_path = C.export_onnx(nn.Linear(4, 2), {"input": torch.zeros(2, 4)}, tmp_path/"lin.onnx", {"input": {0: "batch"}})
    with pytest.raises(ValueError, match="no float32 embedding table"): C.quantize_embeddings_per_row(cnn_path, tmp_path/"x.onnx")


def test_output_loss_is_never_negative_for_nearly_identical_outputs():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = 5*torch.randn(1000, 10, generator=g)
        assert C.output_loss(x, x + 1e-6*torch.randn(x.shape, generator=g)) >= 0
