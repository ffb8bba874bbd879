"""Chapter 10's library (`ptm_course.trust`): integrated gradients by hand against Captum and the
completeness property, ECE against an independent loop, temperature scaling, CheckList generators,
image shifts, the new-domain transfer in fast mode, and `ptm-course bench trust` in fast mode."""
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from ptm_course import trust
from ptm_course.data import MNIST_MEAN, MNIST_STD

WHITE, BLACK = (1 - MNIST_MEAN)/MNIST_STD, -MNIST_MEAN/MNIST_STD


def _tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4*13*13, 10)).eval()


def test_integrated_gradients_by_hand_matches_captum_on_a_tiny_model():
    model, x = _tiny_cnn(), torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    res = trust.check_integrated_gradients(model, x, [1, 4, 7], baseline=BLACK, steps=32)
    assert res["by_hand"].shape == x.shape
    assert res["max_relative_difference"] < 1e-4
    assert torch.allclose(res["completeness_by_hand"], res["completeness_captum"], rtol=1e-3, atol=1e-6)


def test_completeness_is_exact_for_a_linear_model_and_improves_with_steps():
    linear = nn.Linear(8, 3)
    x, b = torch.randn(5, 8), torch.randn(8)
    ig = trust.integrated_gradients(linear, x, 1, b, steps=1)
    assert torch.allclose(ig, linear.weight[1].detach()*(x - b), atol=1e-6)
    assert trust.completeness_error(ig, linear, x, 1, b).max() < 1e-5
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    errs = [trust.completeness_error(trust.integrated_gradients(net, x, 2, steps=m), net, x, 2).max().item() for m in (2, 16, 128)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3


def test_integrated_gradients_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"): trust.integrated_gradients(nn.Linear(3, 2), torch.zeros(1, 3), 0, steps=0)
    with pytest.raises(ValueError, match="broadcast"): trust.integrated_gradients(nn.Linear(3, 2), torch.zeros(2, 3), 0, baseline=torch.zeros(4))


def _ece_loop(probs, labels, n_bins):
    count, conf, right = [0]*n_bins, [0.0]*n_bins, [0]*n_bins
    for p, y in zip(probs.tolist(), labels.tolist()):
        c = max(p); b = min(max(math.ceil(c*n_bins) - 1, 0), n_bins - 1)
        count[b] += 1; conf[b] += c; right[b] += int(p.index(c) == y)
    return sum(n/len(labels)*abs(r/n - s/n) for n, s, r in zip(count, conf, right) if n)


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_ece_matches_a_loop_and_sklearn_bin_accuracies(n_bins):
    from sklearn.calibration import calibration_curve
    g = torch.Generator().manual_seed(n_bins)
    probs = (3*torch.randn(2000, 10, generator=g, dtype=torch.float64)).softmax(-1)
    labels = torch.randint(0, 10, (2000,), generator=g)
    assert trust.expected_calibration_error(probs, labels, n_bins) == pytest.approx(_ece_loop(probs, labels, n_bins), abs=1e-6)
    conf, pred = probs.max(1)
    acc, _ = calibration_curve((pred == labels).numpy(), conf.numpy(), n_bins=n_bins, strategy="uniform")
    bins = trust.reliability_bins(probs, labels, n_bins)
    assert np.allclose(acc, bins["accuracy"][bins["count"] > 0].numpy())
    with pytest.raises(ValueError, match="n_bins"): trust.expected_calibration_error(probs, labels, 0)
    with pytest.raises(ValueError, match="labels"): trust.expected_calibration_error(probs, labels[:5])


def test_temperature_scaling_lowers_nll_and_ece_on_an_overconfident_model():
    g = torch.Generator().manual_seed(0)
    logits = 2*torch.randn(6000, 10, generator=g)
    labels = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    sharp = 3*logits
    rep = trust.temperature_report(sharp[:3000], labels[:3000], sharp[3000:], labels[3000:])
    assert rep["temperature"] == pytest.approx(3.0, rel=0.1)
    assert rep["nll_after"] < rep["nll_before"] and rep["ece_after"] < rep["ece_before"]/2


def test_checklist_tests_are_deterministic_and_run():
    reviews = ["A fine and moving film.", "Dull from start to finish."]
    assert trust.checklist_tests(reviews) == trust.checklist_tests(reviews)
    tests = trust.checklist_tests(reviews)
    assert {t["kind"] for t in tests.values()} == {"MFT", "INV", "DIR"}
    for name, t in tests.items():
        assert t["cases"], name
        for c in t["cases"]:
            assert set(c) == ({"text", "label"} if t["kind"] == "MFT" else {"original", "perturbed"})
    assert all(c["perturbed"].endswith(".") and "but" in c["perturbed"] for c in tests["DIR: append a negative clause"]["cases"])
    typo = trust.add_typo("The wonderful film", random.Random(3))
    assert typo != "The wonderful film" and sorted(typo) == sorted("The wonderful film")
    rows = trust.run_checklist(lambda texts: np.array([0.9 if ("great" in t and "not" not in t) else 0.1 for t in texts]), tests)
    rates = {r["test"]: r["failure_rate"] for r in rows}
    assert rates["MFT: 'The film was great.' is fresh"] == pytest.approx(7/8)  # only "great" of the 8 positive words is known
    assert rates["DIR: add 'not' before a positive word"] == 0.0
    with pytest.raises(ValueError, match="kind"): trust.run_checklist(lambda t: np.zeros(len(t)), {"x": dict(kind="ABC", cases=[{}])})


@pytest.mark.parametrize("kind,sizes", [("rotation", (0, 30, 90)), ("noise", (0.0, 0.5)), ("thickness", (-1, 0, 1, 2)), ("inversion", (0.0, 0.5, 1.0))])
def test_shifts_keep_shape_and_pixel_range(kind, sizes):
    from ptm_course.data import mnist_tensors
    x, _ = mnist_tensors(train=False, limit=16)
    for s in sizes:
        y = trust.shift_digits(x, kind, s)
        assert y.shape == x.shape and y.min() >= BLACK - 1e-5 and y.max() <= WHITE + 1e-5
    assert torch.allclose(trust.shift_digits(x, kind, sizes[0] if kind != "thickness" else 0), x, atol=1e-5)


def test_shifts_reject_bad_input():
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match="Unknown shift"): trust.shift_digits(x, "blur", 1)
    with pytest.raises(ValueError, match="whole number"): trust.shift_digits(x, "thickness", 0.5)
    with pytest.raises(ValueError, match="images"): trust.shift_digits(torch.zeros(2, 28, 28), "noise", 0.1)


def test_uci_digits_look_like_mnist_and_transfer_runs_in_fast_mode(monkeypatch):
    monkeypatch.setenv("PTM_FAST", "1")
    from ptm_course.vision import pretrain_autoencoder
    d = trust.uci_digits()
    (x, y), (xt, yt) = d["train"], d["test"]
    assert x.shape[1:] == (1, 28, 28) and len(x) + len(xt) == 1797 and torch.equal(torch.bincount(yt), torch.full((10,), 50))
    assert x.min() >= BLACK - 1e-5 and x.max() <= WHITE + 1e-5 and torch.equal(trust.uci_digits()["test"][1], yt)
    ae, _ = pretrain_autoencoder(x, epochs=1, desc="pretrain (test)")
    rows = trust.digits_transfer(ae, x, y, xt, yt, per_class=(10,), seeds=(0, 1), **trust.TRANSFER_RECIPES["fast"])
    assert len(rows) == 4 and {r["labels"] for r in rows} == {100}
    table = trust.transfer_table(rows)
    assert table[0]["seeds"] == 2 and table[0]["gain"] == pytest.approx(table[0]["pretrained"] - table[0]["scratch"])
    assert "± " in trust.format_transfer_table(table)


def test_probe_finds_the_informative_layer():
    rng = np.random.default_rng(0)
    good, noise = rng.normal(size=(300, 6)), rng.normal(size=(300, 6))
    y = (good[:, 1] > 0).astype(int)
    scores = trust.probe_layers([noise[:200], good[:200]], y[:200], [noise[200:], good[200:]], y[200:])
    assert scores[1] > 0.9 > 0.75 > scores[0]


def test_bench_trust_fast_mode_prints_json_last(monkeypatch, tmp_path, capsys):
    from ptm_course import bench
    monkeypatch.setenv("PTM_FAST", "1")
    out = tmp_path/"trust.json"
    assert bench.bench_cli("trust", json_path=str(out)) == 0
    res = json.loads(out.read_text())
    for key in ("mnist_ig_completeness_error", "probe_best_layer", "checklist_failure_rates", "ece_before", "ece_after",
                "transfer_digits_gain_10_labels", "cpu", "mode", "seconds"):
        assert key in res, key
    assert res["mode"] == "fast" and 0 <= res["probe_best_layer"] <= 6 and res["mnist_ig_captum_max_relative_difference"] < 1e-4
    assert set(res["ece_before"]) == {"mnist_cnn", "minilm_reviews"}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["probe_best_layer"] == res["probe_best_layer"]
