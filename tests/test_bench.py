"""Smoke test of `ptm-course bench mnist` in fast mode: it runs, prints a table, and ends with one JSON line."""
import json
import math

import pytest

from ptm_course import bench

REQUIRED = {"ours_acc", "ours_time_to_99_s", "examples_1epoch_s", "examples_1epoch_acc", "fastest_public_s",
            "fastest_public_acc", "device"}


def test_bench_mnist_fast_mode_prints_json_last(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PTM_FAST", "1")
    out_file = tmp_path/"bench.json"
    assert bench.bench_cli("mnist", json_path=str(out_file), runs=1) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    last = json.loads(lines[-1])
    assert REQUIRED <= set(last)
    assert last["fast_mode"] is True and last["runs"] == 1
    assert "hardware" in last and last["hardware"]["torch_threads"] >= 1 and last["hardware"]["cpu"]
    for key in ("examples_1epoch_s", "fastest_public_s"):
        assert last[key] > 0
    for key in ("ours_acc", "examples_1epoch_acc", "fastest_public_acc"):
        assert 0 <= last[key] <= 100
    assert last["ours_time_to_99_s"] is None or last["ours_time_to_99_s"] > 0
    written = json.loads(out_file.read_text())
    assert written["ours_acc"] == last["ours_acc"] and "recipes" in written and "clock" in written
    assert any("recipe" in l and "to 99 % s" in l for l in lines), "the side-by-side table is missing"


def test_bench_cli_rejects_unknown_names(capsys):
    assert bench.bench_cli("nope") == 2
    assert "Unknown benchmark" in capsys.readouterr().err


def test_time_to_accuracy_and_summary():
    assert bench.time_to_accuracy([(1.0, 1, 98.9), (2.5, 2, 99.0)]) == 2.5
    assert bench.time_to_accuracy([(1.0, 1, 98.9)]) == math.inf
    s = bench.summarize([[(3.0, 1, 99.2)], [(5.0, 1, 98.0)], [(4.0, 1, 99.1)]])
    assert s["time_to_target_s"] == 4.0  # the median of 3.0, inf and 4.0
    assert s["runs_reaching_target"] == 2 and s["final_acc"] == 99.1


def test_fastest_public_recipe_learns_on_a_slice():
    import torch
    from ptm_course.data import mnist_tensors
    d = {}
    d["x_train"], d["y_train"] = mnist_tensors(True, "cpu", limit=3000)
    d["x_test"], d["y_test"] = mnist_tensors(False, "cpu", limit=500)
    (seconds, epochs, acc), = bench.fastest_public_recipe(d, 0, torch.device("cpu"), epochs=2)
    assert seconds > 0 and acc > 80, acc


def test_bench_bert_fast_mode_prints_json_last(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PTM_FAST", "1")
    assert bench.bench_cli("bert", json_path=str(tmp_path/"bert.json"), runs=1) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    last = json.loads(lines[-1])
    assert {"minilm_acc", "small_pretrained_acc", "small_scratch_acc", "mlm_val_loss", "unigram_val_loss", "device"} <= set(last)
    assert last["fast_mode"] is True and last["seeds"] == 1 and last["hardware"]["cpu"]
    assert all(0 <= last[k] <= 100 for k in ("minilm_acc", "small_pretrained_acc", "small_scratch_acc"))
    assert 0 < last["mlm_val_loss"] and 0 < last["unigram_val_loss"] < 11
    written = json.loads((tmp_path/"bert.json").read_text())
    assert set(written["finetuning"]) == {"minilm", "small_pretrained", "small_scratch"}
    assert any(l.startswith("minilm") for l in lines), "the table is missing"
