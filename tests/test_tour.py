"""`ptm-course tour` (chapter 9) in fast mode: every step runs, the report's numbers are the ones in
`results.json`, and the models folder it writes is one `ptm-course serve` accepts."""
import json
import re

import httpx
import pytest

from ptm_course import deploy as D
from ptm_course.cli import main


@pytest.fixture(scope="module")
def tour_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tour")
    with pytest.MonkeyPatch.context() as mp:  # as outside pytest (PTM_FAST unset): only --fast says the run is a smoke test
        mp.setattr(D, "is_fast", lambda: False)
        assert main(["tour", "--fast", "--out", str(out)]) == 0
    return out


def test_tour_writes_report_plots_results_and_models(tour_dir):
    for name in ("report.md", "results.json", "pretraining.png", "finetuning.png", "latency.png"):
        assert (tour_dir/name).stat().st_size > 0, name
    for name in ("pretraining.png", "finetuning.png", "latency.png"):
        assert (tour_dir/name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = D.read_manifest(tour_dir/"models")
    assert set(manifest["models"]) == {"digits_fp32", "digits_int8"}
    assert manifest["fast_mode"] is True and set(manifest["files"]) == {"digits_fp32.onnx", "digits_int8.onnx"}


def test_report_shows_the_measured_numbers(tour_dir):
    res = json.loads((tour_dir/"results.json").read_text())
    report = (tour_dir/"report.md").read_text()
    assert "Fast mode" in report and res["fast_mode"] is True
    for key in ("few_labels_pretrained_acc", "few_labels_scratch_acc", "deployed_acc", "onnx_fp32_acc", "onnx_int8_acc"):
        assert f"{res[key]:.2f} %" in report, key
    assert f"{res['onnx_max_abs_diff']:.1e}" in report and res["onnx_max_abs_diff"] < 1e-4
    assert res["onnx_fp32_acc"] == res["pytorch_fp32_acc"]  # the same model, to rounding: the same argmax on 500 images
    rows = [r for r in res["latency_rows"] if r["batch"] == 1]
    assert {r["runner"] for r in rows} == {"PyTorch eager fp32", "ONNX Runtime fp32", "ONNX Runtime int8"}
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in res["latency_rows"])
    assert len(re.findall(r"^\| (PyTorch|ONNX)", report, flags=re.M)) == len(res["latency_rows"]) + 3


def test_the_tour_model_can_be_served(tour_dir):
    pixels = [[0.0]*28 for _ in range(28)]
    for r in range(4, 24): pixels[r][14] = 1.0
    with D.server_process(tour_dir/"models") as url:
        answer = httpx.post(url + "/v1/digits", json={"pixels": pixels}).json()
        assert answer["model"] == "digits_int8.onnx" and abs(sum(answer["probabilities"].values()) - 1) < 1e-4
        assert httpx.post(url + "/v1/reviews", json={"text": "fine"}).status_code == 404
