"""Tests of ptm_course.vision (chapter 4): model shapes, learning, the encoder transfer, the corruption, caching."""
import copy

import pytest
import torch
import torch.nn.functional as F

from ptm_course import vision as V
from ptm_course.data import mnist_tensors


@pytest.fixture(scope="module")
def mnist():
    x, y = mnist_tensors(True, "cpu", limit=3000)
    xt, yt = mnist_tensors(False, "cpu", limit=500)
    return x, y, xt, yt


def test_seed_cnn_is_pytorch_examples_net():
    net = V.MnistCNN()
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert V.count_parameters(net) == 1_199_882
    assert net.fc1.in_features == 9216 and net.dropout1.p == 0.25 and net.dropout2.p == 0.5


def test_fast_and_public_networks():
    fast = V.FastCNN()
    assert fast(torch.zeros(2, 1, 24, 24)).shape == (2, 10)
    x = torch.randn(2, 1, 28, 28)
    fast.eval()
    torch.testing.assert_close(fast(x), fast(V.center_crop(x, 24)))  # 28x28 input is cropped inside
    assert V.PublicFastCNN()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert V.count_parameters(V.PublicFastCNN()) == 215_194


def test_center_crop():
    x = torch.arange(36.).reshape(1, 1, 6, 6)
    assert V.center_crop(x, 2).flatten().tolist() == [14., 15., 20., 21.]
    with pytest.raises(ValueError):
        V.center_crop(x, 7)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9, 50])
def test_one_cycle_survives_short_runs(n):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = V.one_cycle(opt, 0.5, n)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
    assert all(0 < lr <= 0.5 + 1e-12 for lr in lrs)
    if n >= 4: assert max(lrs) > 0.45 and lrs[-1] < lrs[0]


def test_evaluate_and_confusion():
    class Oracle(torch.nn.Module):  # "predicts" the label stored in pixel 0
        def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
        def forward(self, x): return F.one_hot(x[:, 0, 0, 0].long(), 10).float()*10 + self.w
    x = torch.zeros(20, 1, 28, 28); y = torch.arange(20) % 10
    x[:, 0, 0, 0] = y.float()
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    m = V.evaluate_classifier(Oracle(), loader)
    assert m["accuracy"] == 100.0 and m["test_loss"] < 1e-3
    assert V.evaluate_accuracy(Oracle(), x, (y + 1) % 10) == 0.0
    cm = V.confusion_matrix(y, V.predict(Oracle(), x))
    assert torch.equal(cm, 2*torch.eye(10, dtype=torch.long))


def test_short_training_improves_accuracy(mnist):
    x, y, xt, yt = mnist
    torch.manual_seed(0)
    model = V.FastCNN()
    before = V.evaluate_accuracy(model, xt, yt)
    h = V.train_mnist_cnn(model, x[:2000], y[:2000], xt, yt, epochs=2, batch_size=64, lr=5e-3, device="cpu", desc="test")
    assert h.last("accuracy") > 80 > before + 30, (before, h.last("accuracy"))
    assert "test_loss" in h.keys() and h.rows[-1]["step"] == 2*(2000//64)


def test_fast_recipe_learns_on_a_slice(mnist):
    x, y, xt, yt = mnist
    model, acc = V.train_fast_mnist(x, y, xt, yt, seed=0, epochs=3, batch_size=256, device="cpu")
    assert isinstance(model, V.FastCNN) and acc > 80, acc


def test_corruption():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(V.random_affine(x, 0, 0, 0), x, atol=1e-5, rtol=0)
    assert not torch.allclose(V.random_affine(x), x)
    assert torch.equal(V.mask_patches(x, 0.0), x)
    assert (V.mask_patches(x, 1.0) == V.BLACK).all()
    m = V.mask_patches(x, 0.5)
    assert ((m == x) | (m == V.BLACK)).all()
    blacked = (m == V.BLACK).reshape(4, 7, 4, 7, 4).permute(0, 1, 3, 2, 4).reshape(4, 49, 16)
    assert ((blacked.all(-1)) | (~blacked.any(-1))).all()  # whole 4x4 patches, never parts
    assert abs(V.BLACK - (0 - 0.1307)/0.3081) < 1e-9


def test_autoencoder_shapes_and_pretraining_lowers_the_loss(mnist):
    x = mnist[0][:512]
    ae, h = V.pretrain_autoencoder(x, epochs=3, batch_size=64, device="cpu", desc="test")
    assert ae.encode(x[:2]).shape == (2, 32) and ae(x[:2]).shape == (2, 1, 28, 28)
    first = sum(r["loss"] for r in h.rows[:3])/3
    last = sum(r["loss"] for r in h.rows[-3:])/3
    assert last < 0.8*first, (first, last)


def test_encoder_transfer_copies_weights_and_leaves_the_autoencoder_alone(mnist):
    x, y, xt, yt = mnist
    ae = V.Autoencoder(V.ConvEncoder(), V.ConvDecoder())
    clf = V.transfer_encoder(ae)
    assert clf.encoder is not ae.encoder
    for k, v in ae.encoder.state_dict().items():
        assert torch.equal(v, clf.encoder.state_dict()[k]), k
    torch.manual_seed(1)
    scratch = V.transfer_encoder(None)
    assert not torch.equal(scratch.encoder.to_code.weight, ae.encoder.to_code.weight)
    before = copy.deepcopy(ae.state_dict())
    idx = V.balanced_subset(y, 100, seed=0)
    h = V.finetune(clf, x[idx], y[idx], xt, yt, probe_steps=4, min_steps=5, min_epochs=1, evaluations=1, device="cpu", desc="test")
    assert [r["phase"] for r in h.rows] == ["probe"]*4 + ["fine-tune"]*5
    assert all(p.requires_grad for p in clf.parameters())
    assert all(torch.equal(v, ae.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(clf.encoder.to_code.weight, ae.encoder.to_code.weight)


def test_balanced_subset():
    y = torch.arange(1000) % 10
    idx = V.balanced_subset(y, 100, seed=0)
    assert torch.bincount(y[idx], minlength=10).tolist() == [10]*10 and len(set(idx.tolist())) == 100
    assert torch.equal(idx, V.balanced_subset(y, 100, seed=0))
    assert not torch.equal(idx, V.balanced_subset(y, 100, seed=1))
    assert len(V.balanced_subset(y, 5000)) == 1000
    with pytest.raises(ValueError):
        V.balanced_subset(torch.zeros(50, dtype=torch.long), 20)


def test_cached_autoencoder_round_trip(mnist, tmp_path):
    x = mnist[0][:256]
    ae1, h1 = V.cached_autoencoder(x, epochs=1, device="cpu", cache=tmp_path, batch_size=64, desc="test")
    assert h1 is not None and len(list(tmp_path.glob("*.safetensors"))) == 1
    ae2, h2 = V.cached_autoencoder(x, epochs=1, device="cpu", cache=tmp_path)
    for k, v in ae1.state_dict().items():
        assert torch.equal(v, ae2.state_dict()[k]), k
    assert h2 is not None and len(h2) == len(h1)


def test_nearest_neighbour_and_pca():
    a = torch.eye(4)
    assert V.nearest_neighbour_accuracy(a, torch.arange(4), 3*a, torch.arange(4)) == 100.0
    assert V.nearest_neighbour_accuracy(a, torch.arange(4), 3*a, torch.arange(4).flip(0)) == 0.0
    torch.manual_seed(0)
    pts = V.pca_2d(torch.randn(200, 6)*torch.tensor([9., 3., .1, .1, .1, .1]))
    assert pts.shape == (200, 2) and pts[:, 0].var() > pts[:, 1].var() > 1


def test_label_efficiency_table_shape(mnist):
    x, y, xt, yt = mnist
    ae = V.Autoencoder(V.ConvEncoder(), V.ConvDecoder())
    res = V.label_efficiency(ae, x[:1000], y[:1000], xt[:200], yt[:200], label_counts=(100, 5000), seeds=(0, 1),
                             device="cpu", probe_steps=2, min_steps=3, min_epochs=1, evaluations=1)
    assert set(res) == {(s, n, k) for s in ("pretrained", "scratch") for n in (100, 1000) for k in (0, 1)}
    rows = V.efficiency_table(res)
    assert [r["labels"] for r in rows] == [100, 1000]
    assert all(abs(r["gain"] - (r["pretrained"][0] - r["scratch"][0])) < 1e-9 for r in rows)
    assert "| 100 |" in V.format_efficiency_table(rows)


def test_linear_probe_leaves_the_encoder_unchanged(mnist):
    x, y, xt, yt = mnist
    clf = V.transfer_encoder(V.Autoencoder(V.ConvEncoder(), V.ConvDecoder()))
    clf.eval()  # BatchNorm statistics are not weights: compare the parameters only
    before = {k: v.clone() for k, v in clf.encoder.named_parameters()}
    head_before = clf.head.weight.clone()
    idx = V.balanced_subset(y, 100, seed=0)
    V.finetune(clf, x[idx], y[idx], xt, yt, probe_steps=5, min_steps=1, min_epochs=0, lr=0.0, evaluations=1, device="cpu", desc="test")
    for k, v in clf.encoder.named_parameters():  # lr=0 in the second phase: any change came from the probe
        assert torch.equal(v, before[k]), k
    assert not torch.equal(clf.head.weight, head_before)
