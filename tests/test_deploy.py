"""Chapter 8 (`ptm_course.deploy`): request validation and digit preparation without a server, then
a real server (`ptm-course serve` in a child process, on loopback) driven by a real HTTP client, a
headless Chromium that draws on the page, and a bounded load test; `ptm-course bench deploy` in
fast mode. The models are the fast-mode ones (a few seconds of training): the tests check the
plumbing and agreement with ONNX Runtime called directly, not the models' accuracy."""
import base64
import io
import json
import shutil

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from browser_helpers import chromium
from ptm_course import deploy as D
from ptm_course.compress import export_onnx
from ptm_course.data import load_mnist, mnist_tensors


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.clip(array*255, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def mnist_pixels(n: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist(train=False)
    return images[:n].numpy().astype(np.float32)/255.0, labels[:n].numpy()


# ---- validation, no server ----

REVIEW_CASES = [  # (content type, body, status, a word the message must contain)
    ("application/json", b'{"text": "A fine film."}', 200, "A fine film."),
    ("Application/JSON; charset=utf-8", b'{"text": "ok"}', 200, "ok"),
    ("text/plain", b'{"text": "ok"}', 415, "application/json"),
    (None, b'{"text": "ok"}', 415, "missing"),
    ("application/json", b'{"text": ', 400, "JSON"),
    ("application/json", b'\xff\xfe{"text": "x"}', 400, "UTF-8"),
    ("application/json", b'["text"]', 400, "object"),
    ("application/json", b'{"review": "x"}', 422, "text"),
    ("application/json", b'{"text": 5}', 422, "string"),
    ("application/json", b'{"text": " \\n\\t "}', 422, "empty"),
    ("application/json", json.dumps({"text": "é"*2001}).encode(), 422, "2,000"),
    ("application/json", b" "*70_000, 413, "limit"),
]


@pytest.mark.parametrize("content_type,body,status,word", REVIEW_CASES)
def test_validate_review_request_follows_the_contract(content_type, body, status, word):
    got_status, message = D.validate_review_request(content_type, body)
    assert got_status == status, message
    assert word in message


def test_review_length_counts_characters_not_bytes():
    text = "é"*2000  # 4,000 bytes in UTF-8, 2,000 characters: allowed
    assert D.validate_review_request("application/json", json.dumps({"text": text}, ensure_ascii=False).encode()) == (200, text)


def test_pixels_are_normalized_like_the_training_data():
    pixels, _ = mnist_pixels(3)
    for i in range(3):
        got = D.parse_digit_request("application/json", json.dumps({"pixels": (pixels[i]*255).round().tolist()}).encode())
        want = mnist_tensors(train=False, device="cpu", limit=3)[0][i:i + 1].numpy()
        assert got.shape == (1, 1, 28, 28) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_prepare_digit_turns_a_large_dark_on_light_drawing_back_into_the_mnist_digit():
    pixels, _ = mnist_pixels(50)
    similarity = []
    for digit in pixels:
        big = 1.0 - np.kron(digit, np.ones((10, 10), np.float32))  # 280×280, black ink on white, like a scanned drawing
        got = D.prepare_digit(D.decode_image(png_bytes(big)))
        assert got.shape == (28, 28) and got.min() >= 0 and got.max() <= 1
        similarity.append(np.corrcoef(got.ravel(), digit.ravel())[0, 1])
    assert min(similarity) > 0.75 and np.mean(similarity) > 0.97  # a one-pixel shift of a thin digit costs ~0.4


def test_prepare_digit_centres_an_off_centre_stroke():
    canvas = np.zeros((280, 280), np.float32)
    canvas[10:120, 200:215] = 1.0  # a short vertical stroke in the top right corner
    got = D.prepare_digit(canvas)
    rows, cols = np.nonzero(got > 0.5)
    assert got[rows, cols].size and abs(rows.mean() - 13.5) <= 1.5 and abs(cols.mean() - 13.5) <= 1.5
    assert rows.max() - rows.min() + 1 >= 18  # scaled up to the 20-pixel box


@pytest.mark.parametrize("content_type,body,status,word", [
    ("application/json", json.dumps({"pixels": [[0.5]*28]*27}).encode(), 422, "shape"),
    ("application/json", json.dumps({"pixels": [[0.5]*28]*27 + [[0.5]*27]}).encode(), 422, "ragged"),
    ("application/json", json.dumps({"pixels": [[300]*28]*28}).encode(), 422, "between"),
    ("application/json", json.dumps({"pixels": [[0]*28]*28}).encode(), 422, "blank"),
    ("application/json", json.dumps({"image": "***"}).encode(), 422, "base64"),
    ("application/json", json.dumps({"image": 5}).encode(), 422, "base64"),
    ("application/json", json.dumps({"digits": []}).encode(), 422, "pixels"),
    ("image/png", b"GIF89a-not-a-png", 422, "PNG"),
    ("image/png", b"", 422, "empty"),
    ("image/png", png_bytes(np.zeros((50, 50))), 422, "blank"),
    ("text/csv", b"1,2,3", 415, "image/png"),
    ("image/png", b"x"*(D.MAX_BODY_BYTES + 1), 413, "limit"),
])
def test_bad_digit_requests_get_a_4xx_that_names_the_problem(content_type, body, status, word):
    with pytest.raises(D.RequestError) as e: D.parse_digit_request(content_type, body)
    assert e.value.status == status and word in e.value.message


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (5000, 4000)).save(buf, format="PNG")  # a few kB of PNG, 20 million pixels
    with pytest.raises(D.RequestError) as e: D.decode_image(buf.getvalue())
    assert e.value.status == 413 and "pixels" in e.value.message


# ---- export check, latency, manifest ----

def test_verify_onnx_accepts_the_export_and_catches_a_wrong_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    path = export_onnx(model, {"input": torch.randn(2, 6)}, tmp_path/"m.onnx", {"input": {0: "batch"}}, input_names=["x"])
    x = torch.randn(5, 6)
    assert D.verify_onnx(model.train(), path, {"x": x}) < 1e-5  # verify_onnx compares in eval mode (dropout off)
    other = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="differs from PyTorch"): D.verify_onnx(other, path, {"x": x})


def test_latency_ms_counts_the_synchronization_inside_the_timer():
    import time
    calls = []
    def sync(): calls.append("sync"); time.sleep(0.004)
    lat = D.latency_ms(lambda: calls.append("fn"), runs=5, warmup=2, sync=sync)
    assert lat["p50"] >= 3.5 and lat["runs"] == 5
    assert calls[:3] == ["fn", "fn", "sync"] and calls[3:] == ["fn", "sync"]*5
    assert D.device_sync("cpu") is None


@pytest.mark.cuda
def test_latency_on_a_gpu_counts_the_queued_work_only_with_sync():
    x = torch.randn(8192, 8192, device="cuda")
    queued = D.latency_ms(lambda: x @ x, runs=20, warmup=3)["p50"]  # returns as soon as the product is queued
    done = D.latency_ms(lambda: x @ x, runs=20, warmup=3, sync=D.device_sync("cuda"))["p50"]
    assert done > 5*queued, (queued, done)


def test_read_manifest_names_missing_and_changed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"): D.read_manifest(tmp_path)
    (tmp_path/"digits_fp32.onnx").write_bytes(b"onnx")
    D.write_manifest(tmp_path, digits_fp32=dict(file="digits_fp32.onnx", labels=D.DIGIT_LABELS))
    import hashlib
    assert D.read_manifest(tmp_path)["models"]["digits_fp32"]["sha256"] == hashlib.sha256(b"onnx").hexdigest()
    (tmp_path/"digits_fp32.onnx").write_bytes(b"ONNX")
    with pytest.raises(ValueError, match="SHA-256"): D.read_manifest(tmp_path)
    (tmp_path/"digits_fp32.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="missing"): D.read_manifest(tmp_path)


def small_folder(tmp_path, tokenizer_files=True):
    "A model folder with one (fake) model file and, if asked, a tokenizer folder; its manifest written by write_manifest."
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path/"digits_fp32.onnx").write_bytes(b"onnx")
    spec = dict(file="digits_fp32.onnx", labels=D.DIGIT_LABELS)
    if tokenizer_files:
        (tmp_path/"tokenizer").mkdir()
        (tmp_path/"tokenizer"/"tokenizer.json").write_text('{"model": "wordpiece"}')
        (tmp_path/"tokenizer"/"vocab.txt").write_text("[PAD]\n[UNK]\n")
        spec["tokenizer"] = "tokenizer"
    D.write_manifest(tmp_path, reviews_fp32=spec)
    return tmp_path


def edit_manifest(folder, change):
    m = json.loads((folder/D.MANIFEST).read_text())
    change(m)
    (folder/D.MANIFEST).write_text(json.dumps(m))


def test_the_manifest_covers_the_tokenizer_files(tmp_path):
    folder = small_folder(tmp_path)
    manifest = D.read_manifest(folder)
    assert set(manifest["files"]) == {"digits_fp32.onnx", "tokenizer/tokenizer.json", "tokenizer/vocab.txt"}
    (folder/"tokenizer"/"tokenizer.json").write_text('{"model": "WORDPIECE"}')  # same size, other content
    with pytest.raises(ValueError, match=r"tokenizer\.json does not match its SHA-256"): D.read_manifest(folder)
    (folder/"tokenizer"/"tokenizer.json").write_text('{"model": "wordpiece"}')
    (folder/"tokenizer"/"added_tokens.json").write_text("{}")  # a file slipped in: not covered, refused
    with pytest.raises(ValueError, match="added_tokens.json is not listed"): D.read_manifest(folder)


@pytest.mark.parametrize("change,word", [
    (lambda m: m["models"]["reviews_fp32"].pop("sha256"), "no valid \"sha256\""),
    (lambda m: m["models"]["reviews_fp32"].update(sha256=5), "no valid \"sha256\""),
    (lambda m: m["files"]["tokenizer/vocab.txt"].pop("sha256"), "no valid \"sha256\""),
    (lambda m: m["models"]["reviews_fp32"].update(file=7), "no 'file'"),
    (lambda m: m["models"]["reviews_fp32"].update(labels="0123456789"), "'labels'"),
    (lambda m: m["models"].update(reviews_fp32=["file"]), "not an object"),
    (lambda m: m.update(models=[]), "\"models\" must be an object"),
    (lambda m: m.pop("files"), "older format"),
    (lambda m: m["models"]["reviews_fp32"].update(file="../outside.onnx"), "outside the model folder"),
    (lambda m: m["models"]["reviews_fp32"].update(file="/etc/passwd"), "outside the model folder"),
    (lambda m: m["models"]["reviews_fp32"].update(tokenizer="../tok"), "outside the model folder"),
    (lambda m: m["files"].update({"../outside.onnx": {"sha256": "0"*64}}), "outside the model folder"),
])
def test_a_malformed_manifest_gets_a_clear_error_naming_it(tmp_path, change, word):
    folder = small_folder(tmp_path/"models")
    edit_manifest(folder, change)
    with pytest.raises((ValueError, FileNotFoundError)) as e: D.read_manifest(folder)
    assert word in str(e.value) and "manifest.json" in str(e.value), str(e.value)


def test_manifest_paths_may_not_escape_through_a_symbolic_link(tmp_path):
    outside = tmp_path/"outside.onnx"
    outside.write_bytes(b"onnx")
    folder = small_folder(tmp_path/"models", tokenizer_files=False)
    (folder/"digits_fp32.onnx").unlink()
    (folder/"digits_fp32.onnx").symlink_to(outside)
    with pytest.raises(ValueError, match="leads outside the model folder"): D.read_manifest(folder)


@pytest.mark.parametrize("text", ["[]", "{", "5", '{"models": {}}', "\udcff"])
def test_a_manifest_that_is_not_a_manifest_names_the_file(tmp_path, text):
    (tmp_path/D.MANIFEST).write_text(text, errors="surrogateescape")
    with pytest.raises(ValueError, match="manifest.json"): D.read_manifest(tmp_path)


def test_load_test_refuses_an_empty_plan():
    with pytest.raises(ValueError, match="at least one"): D.load_test("http://127.0.0.1:9", [], total=1)


# ---- a real server ----

@pytest.fixture(scope="module")
def bundle():
    return D.build_bundle()  # fast mode under pytest: seconds of training, cached for the session


@pytest.fixture(scope="module")
def server(bundle):
    with D.server_process(bundle) as url:
        yield url


def test_health_and_page(server, bundle):
    health = httpx.get(server + "/health").json()
    manifest = D.read_manifest(bundle)
    assert health["status"] == "ok"
    assert health["models"]["digits"]["sha256"] == manifest["models"]["digits_int8"]["sha256"]
    assert health["models"]["reviews"]["file"] == "reviews_int8.onnx"
    page = httpx.get(server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="canvas"' in page.text and "/v1/digits" in page.text and "/v1/reviews" in page.text


def test_served_digits_match_onnx_runtime_called_directly(server, bundle):
    pixels, _ = mnist_pixels(40)
    session = D.ort_session(bundle/"digits_int8.onnx")
    want = session.run(None, {"images": D.normalize_digits(pixels)})[0]
    with httpx.Client(base_url=server) as client:
        answers = [client.post("/v1/digits", json={"pixels": p.tolist()}).json() for p in pixels]
    assert [a["label_id"] for a in answers] == want.argmax(1).tolist()
    probs = np.array([[a["probabilities"][str(d)] for d in range(10)] for a in answers])
    np.testing.assert_allclose(probs, torch.from_numpy(want).softmax(-1).numpy(), atol=1e-5)
    assert all(a["model"] == "digits_int8.onnx" and a["ms"] > 0 for a in answers)


def test_a_drawing_sent_as_png_reads_like_the_mnist_digit(server):
    pixels, _ = mnist_pixels(20)
    agree = 0
    with httpx.Client(base_url=server) as client:
        for p in pixels:
            big = np.kron(p, np.ones((10, 10), np.float32))
            raw = client.post("/v1/digits", content=png_bytes(big), headers={"content-type": "image/png"}).json()
            b64 = client.post("/v1/digits", json={"image": "data:image/png;base64," + base64.b64encode(png_bytes(big)).decode()}).json()
            ref = client.post("/v1/digits", json={"pixels": p.tolist()}).json()
            assert raw["label"] == b64["label"]
            agree += raw["label"] == ref["label"]
    assert agree >= 16, f"only {agree} of 20 upscaled digits got the label of the original 28×28 image"


def test_served_reviews_match_onnx_runtime_called_directly(server, bundle):
    from transformers import AutoTokenizer
    texts = ["A gorgeous, witty, seductive movie.", "The plot is a mess and the jokes fall flat.", "é"*300]
    tok = AutoTokenizer.from_pretrained(bundle/"tokenizer", local_files_only=True)
    session = D.ort_session(bundle/"reviews_int8.onnx")
    for text in texts:
        answer = httpx.post(server + "/v1/reviews", json={"text": text}).json()
        want = torch.from_numpy(session.run(None, D.review_batches([text], tok, max_length=128)[0])[0]).softmax(-1)[0]
        assert answer["label"] in ("rotten", "fresh") and answer["label_id"] == int(want.argmax())
        assert abs(answer["probabilities"]["fresh"] - float(want[1])) < 1e-5


BAD_REQUESTS = [  # (method, path, request kwargs, status, a word the error must contain)
    ("POST", "/v1/reviews", dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "application/json"),
    ("POST", "/v1/reviews", dict(content=b'{"text": ', headers={"content-type": "application/json"}), 400, "JSON"),
    ("POST", "/v1/reviews", dict(json=["a", "list"]), 400, "object"),
    ("POST", "/v1/reviews", dict(json={"text": ""}), 422, "empty"),
    ("POST", "/v1/reviews", dict(json={"text": None}), 422, "string"),
    ("POST", "/v1/reviews", dict(json={"text": "x"*5000}), 422, "limit"),
    ("POST", "/v1/reviews", dict(json={"text": "x"*100_000}), 413, "limit"),
    ("POST", "/v1/digits", dict(json={"pixels": [[1]*10]*10}), 422, "shape"),
    ("POST", "/v1/digits", dict(content=b"GIF89a...", headers={"content-type": "image/gif"}), 422, "PNG"),
    ("POST", "/v1/digits", dict(content=b"\x00"*3_000_000, headers={"content-type": "image/png"}), 413, "limit"),
    ("POST", "/v1/digits", dict(json={"image": "not base64!"}), 422, "base64"),
    ("POST", "/v1/digits", dict(content=b"{}", headers={"content-type": "application/xml"}), 415, "JSON"),
    ("GET", "/v1/digits", dict(), 405, "not allowed"),
    ("POST", "/v2/digits", dict(json={}), 404, "routes"),
]


@pytest.mark.parametrize("method,path,kwargs,status,word", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(server, method, path, kwargs, status, word):
    r = httpx.request(method, server + path, **kwargs)
    assert r.status_code == status, r.text
    assert word in r.json()["error"]
    assert httpx.post(server + "/v1/reviews", json={"text": "Still here?"}).status_code == 200


def test_a_folder_without_a_review_model_says_so(bundle, tmp_path):
    for f in ("digits_int8.onnx", "digits_fp32.onnx"): shutil.copy(bundle/f, tmp_path/f)
    spec = D.read_manifest(bundle)["models"]
    D.write_manifest(tmp_path, **{k: {kk: v for kk, v in spec[k].items() if kk not in ("size_mb", "sha256")} for k in ("digits_int8", "digits_fp32")})
    with D.server_process(tmp_path) as url:
        r = httpx.post(url + "/v1/reviews", json={"text": "fine"})
        assert r.status_code == 404 and "no reviews model" in r.json()["error"]
        assert httpx.post(url + "/v1/digits", json={"pixels": mnist_pixels(1)[0][0].tolist()}).status_code == 200


def test_serve_refuses_a_folder_that_is_not_a_model_folder(tmp_path, capsys):
    from ptm_course.cli import main
    assert main(["serve", "--models", str(tmp_path)]) == 1
    assert "not a model folder" in capsys.readouterr().err


def test_bounded_load_test_has_no_errors(server):
    res = D.load_test(server, D.serving_requests(16), total=200, concurrency=4, time_limit=120)
    print(f"load test: {res['requests']} requests, {res['rps']} requests/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, statuses {res['statuses']}")
    assert res["completed_all"] and res["requests"] == 200
    assert res["errors"] == 0 and res["statuses"] == {"200": 200}
    assert res["rps"] > 0 and 0 < res["p50_ms"] <= res["p99_ms"]


# ---- the page in a real browser ----

@pytest.fixture(scope="module")
def browser_page():
    with chromium() as browser:
        yield browser.new_page(viewport={"width": 900, "height": 1200})


def draw(page, strokes):
    box = page.locator("#canvas").bounding_box()
    page.click("#digit-clear")
    for stroke in strokes:
        page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]: page.mouse.move(box["x"] + x, box["y"] + y, steps=15)
        page.mouse.up()
    page.wait_for_function("document.getElementById('digit-result').textContent !== '-'", timeout=20_000)
    return page.text_content("#digit-result")


def test_browser_draws_a_digit_and_reads_the_prediction(server, browser_page):
    page = browser_page
    page.goto(server + "/")
    shown = draw(page, [[(140, 40), (140, 240)]])  # a vertical stroke: a one
    assert page.locator("#digit-probs .bar").count() == 10
    canvas_png = page.evaluate("document.getElementById('canvas').toDataURL('image/png')")
    assert httpx.post(server + "/v1/digits", json={"image": canvas_png}).json()["label"] == shown  # the page shows the server's answer
    assert shown == "1"
    assert page.text_content("#digit-error") == ""


def test_browser_classifies_a_review_and_shows_errors(server, browser_page):
    page = browser_page
    page.goto(server + "/")
    text = "A gorgeous, witty, seductive movie."
    page.fill("#review-text", text)
    page.click("#review-submit")
    page.wait_for_function("document.getElementById('review-result').textContent !== '-'", timeout=20_000)
    assert page.text_content("#review-result") == httpx.post(server + "/v1/reviews", json={"text": text}).json()["label"]
    assert page.locator("#review-probs .bar").count() == 2
    page.fill("#review-text", "   ")
    page.click("#review-submit")
    page.wait_for_function("document.getElementById('review-error').textContent !== ''", timeout=20_000)
    assert "empty" in page.text_content("#review-error") and page.text_content("#review-result") == "-"


# ---- the benchmark ----

REQUIRED = {"onnx_max_abs_diff", "minilm_eager_p50_ms", "minilm_ort_int8_p50_ms", "cnn_eager_p50_ms", "cnn_ort_p50_ms",
            "serve_rps", "serve_p99_ms", "serve_errors", "device"}


def test_bench_deploy_fast_mode_prints_json_last(bundle, tmp_path, capsys):
    from ptm_course import bench
    out_file = tmp_path/"deploy.json"
    assert bench.bench_cli("deploy", json_path=str(out_file), runs=3) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    last = json.loads(lines[-1])
    assert REQUIRED <= set(last) and "latency_rows" not in last
    assert last["onnx_max_abs_diff"] < 1e-4 and last["serve_errors"] == 0 and last["serve_requests"] == last["serve_planned"]
    assert all(last[k] > 0 for k in ("minilm_eager_p50_ms", "minilm_ort_int8_p50_ms", "cnn_eager_p50_ms", "cnn_ort_p50_ms", "serve_rps"))
    assert json.loads(out_file.read_text())["hardware"]["cpu_cores"] >= 1


def test_the_library_passes_its_own_exercise_checkers():
    "The server's validator and the course's latency timer follow the contracts chapter 8's exercises teach."
    from ptm_course.checks import deploy as checks
    for result in (checks.check_validate_review_request(D.validate_review_request), checks.check_measure_latency(D.latency_ms)):
        assert result.passed, result
