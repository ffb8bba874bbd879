"""The bundled data: bit-exact MNIST, a leak-free review split, Austen by novel, clear errors."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from ptm_course import data
from ptm_course.core import get_device

CANONICAL_MD5 = {  # the canonical MNIST files, independent of the copy in ptm_course.data
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 47_040_016),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 60_008),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 7_840_016),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 10_008),
}
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    "A private copy of the bundled data, and a private cache, that a test may damage."
    copy = tmp_path/"bundled"
    shutil.copytree(data.bundled_dir(), copy)
    monkeypatch.setenv("PTM_DATA_DIR", str(copy))
    monkeypatch.setenv("PTM_CACHE_DIR", str(tmp_path/"cache"))
    return copy


def flip_byte(path: Path, offset: int = 1000):
    b = bytearray(path.read_bytes()); b[offset] ^= 0xFF; path.write_bytes(bytes(b))


def test_mnist_raw_files_are_canonical():
    raw = data.mnist_root()/"MNIST"/"raw"
    for name, (md5, size) in CANONICAL_MD5.items():
        blob = (raw/name).read_bytes()
        assert len(blob) == size, name
        assert hashlib.md5(blob).hexdigest() == md5, name


def test_mnist_shapes_and_label_counts():
    x, y = data.load_mnist(train=True)
    xt, yt = data.load_mnist(train=False)
    assert x.shape == (60_000, 28, 28) and x.dtype == torch.uint8
    assert xt.shape == (10_000, 28, 28) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == TRAIN_COUNTS
    assert torch.bincount(yt).tolist() == TEST_COUNTS


def test_torchvision_reads_mnist_root_and_agrees():
    for train in (True, False):
        tv = torchvision.datasets.MNIST(data.mnist_root(), train=train, download=False)
        x, y = data.load_mnist(train)
        assert torch.equal(tv.data, x) and torch.equal(tv.targets, y)


def test_mnist_tensors_normalized_on_device():
    device = get_device()
    x, y = data.mnist_tensors(train=False, device=device, limit=500)
    assert x.shape == (500, 1, 28, 28) and x.device.type == device.type and y.device.type == device.type
    raw, _ = data.mnist_tensors(train=False, device=device, normalize=False, limit=500)
    assert 0 <= raw.min().item() and raw.max().item() <= 1
    full, _ = data.mnist_tensors(train=True, device="cpu")
    assert abs(full.mean().item()) < 1e-2 and abs(full.std().item() - 1) < 1e-2


def test_device_loader_covers_every_sample_once_per_epoch():
    device = get_device()
    x = torch.arange(103, device=device).float()
    y = torch.arange(103, device=device)
    loader = data.DeviceLoader(x, y, batch_size=10, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(loader) == len(batches) == 11
    assert all(xb.device.type == device.type for xb, _ in batches)
    seen = torch.cat([yb for _, yb in batches]).cpu()
    assert sorted(seen.tolist()) == list(range(103))
    assert seen.tolist() != list(range(103)), "shuffle=True must shuffle"
    assert all(torch.equal(xb.long(), yb) for xb, yb in batches), "rows of x and y stay aligned"
    assert len(list(data.DeviceLoader(x, y, batch_size=10, drop_last=True))) == 10


def test_device_loader_same_seed_same_order_and_clear_errors():
    x = torch.arange(50)
    order = lambda seed: torch.cat([b for (b,) in data.DeviceLoader(x, batch_size=7, generator=torch.Generator().manual_seed(seed))]).tolist()
    assert order(1) == order(1) and order(1) != order(2)
    with pytest.raises(ValueError, match="same first dimension"): data.DeviceLoader(x, torch.arange(49))
    with pytest.raises(ValueError, match="batch_size"): data.DeviceLoader(x, batch_size=0)


def test_dataloader_path_matches_resident_tensors():
    xb, yb = next(iter(data.mnist_dataloader(train=False, batch_size=32, shuffle=False)))
    x, y = data.mnist_tensors(train=False, device="cpu", limit=32)
    torch.testing.assert_close(xb, x, atol=1e-6, rtol=0)
    assert torch.equal(yb, y)


def test_review_split_has_no_movie_in_two_splits():
    splits = data.review_splits(seed=0)
    movies = {name: {r.movie for r in part} for name, part in splits.items()}
    assert not movies["train"] & movies["validation"]
    assert not movies["train"] & movies["test"]
    assert not movies["validation"] & movies["test"]
    sizes = {name: len(part) for name, part in splits.items()}
    total = sum(sizes.values())
    assert 0.75 < sizes["train"] / total < 0.85 and 0.07 < sizes["test"] / total < 0.13


def test_reviews_labels_duplicates_and_plots():
    reviews = data.load_reviews()
    texts = [r.text for r in reviews]
    assert len(texts) == len(set(texts)), "duplicate texts must be dropped"
    assert {r.label for r in reviews} == {0, 1}
    assert len(reviews) == 12_808 - 56  # 7,403 fresh + 5,405 rotten, minus 56 repeated texts; no plots
    assert sum(r.label for r in reviews) > len(reviews) / 2  # fresh (1) is the majority class


def test_review_split_is_deterministic():
    a, b, c = data.review_splits(seed=0), data.review_splits(seed=0), data.review_splits(seed=1)
    assert a == b
    assert {r.movie for r in a["test"]} != {r.movie for r in c["test"]}
    with pytest.raises(ValueError, match="sum to 1"): data.review_splits(fractions=(0.5, 0.2, 0.2))


def test_austen_by_novel():
    novels = data.austen_novels()
    assert list(novels) == list(data.AUSTEN_NOVELS)
    assert sum(len(t.split()) for t in novels.values()) == 717_537
    assert novels["Pride and Prejudice"].lstrip().upper().startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in novels["Pride and Prejudice"]
    assert "It is a truth universally acknowledged" not in novels["Emma"]


def test_corrupt_file_gives_clear_error(data_copy):
    flip_byte(data_copy/"austen.txt.gz")
    with pytest.raises(data.DataFileError) as e: data.austen_novels()
    msg = str(e.value)
    assert "austen.txt.gz" in msg and "corrupt" in msg and "rebuild_data.py" in msg


def test_missing_file_gives_clear_error(data_copy):
    (data_copy/"rotten_tomatoes_corpus_full.csv.bz2").unlink()
    with pytest.raises(data.DataFileError, match="rotten_tomatoes_corpus_full.csv.bz2.*missing"): data.load_reviews()


def test_corrupt_mnist_gives_clear_error(data_copy):
    flip_byte(data_copy/"mnist"/"t10k-labels-idx1-ubyte.gz", 100)
    with pytest.raises(data.DataFileError, match="t10k-labels-idx1-ubyte.gz"): data.mnist_root()


def test_damaged_cache_is_rebuilt(data_copy):
    raw = data.mnist_root()/"MNIST"/"raw"
    flip_byte(raw/"t10k-labels-idx1-ubyte", 500)
    data.mnist_root()
    assert hashlib.md5((raw/"t10k-labels-idx1-ubyte").read_bytes()).hexdigest() == CANONICAL_MD5["t10k-labels-idx1-ubyte"][0]


def test_verification_happens_once_per_cache(data_copy, monkeypatch):
    calls = []
    real = data.file_digest
    monkeypatch.setattr(data, "file_digest", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    data.bundled_file("austen.txt.gz"); data.bundled_file("austen.txt.gz"); data.bundled_file("austen.txt.gz")
    assert len(calls) == 1
    flip_byte(data_copy/"austen.txt.gz")  # a change to the file is noticed: it is checked again
    with pytest.raises(data.DataFileError): data.bundled_file("austen.txt.gz")


def same_size_edit(path: Path, offset: int):
    "Change one byte and put the old modification time back: what the size-and-mtime check used to miss."
    st = path.stat()
    flip_byte(path, offset)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_same_size_edit_of_the_decompressed_mnist_copy_does_not_load(data_copy):
    images, labels = data.load_mnist(train=False)
    raw = data.mnist_root()/"MNIST"/"raw"
    same_size_edit(raw/"t10k-labels-idx1-ubyte", 500)
    again_images, again_labels = data.load_mnist(train=False)  # noticed, rebuilt from the bundled copy: the true labels
    assert torch.equal(again_labels, labels) and torch.equal(again_images, images)
    assert hashlib.md5((raw/"t10k-labels-idx1-ubyte").read_bytes()).hexdigest() == CANONICAL_MD5["t10k-labels-idx1-ubyte"][0]


def test_a_changed_cache_copy_is_caught_as_it_is_read(data_copy):
    "Even an edit the stamp cannot see (its record rewritten to match the edited file) is caught by the md5 of the bytes read."
    import json
    images, labels = data.load_mnist(train=False)
    path = data.mnist_root()/"MNIST"/"raw"/"t10k-labels-idx1-ubyte"
    flip_byte(path, 500)
    st = path.stat()
    data._stamp_path(path).write_text(json.dumps(dict(path=str(path.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns, inode=st.st_ino, algorithm="md5", digest=data.MNIST_MD5["t10k-labels-idx1-ubyte"])))
    data.verify_file(path, data.MNIST_MD5["t10k-labels-idx1-ubyte"], "md5")  # the stamp vouches for the edited file
    again_images, again_labels = data.load_mnist(train=False)
    assert torch.equal(again_labels, labels) and torch.equal(again_images, images)


def test_a_same_size_edit_of_austen_gives_the_clear_error(data_copy):
    data.austen_novels()  # verified and stamped
    same_size_edit(data_copy/"austen.txt.gz", 1000)
    with pytest.raises(data.DataFileError, match="austen.txt.gz.*corrupt"): data.austen_novels()


def test_an_undecompressable_austen_names_the_file_not_bad_gzip(data_copy, monkeypatch):
    import gzip
    bad = data_copy/"austen_bad.txt.gz"
    bad.write_bytes(b"not gzip at all" + b"\0"*100)
    monkeypatch.setattr(data, "bundled_file", lambda name, force=False: bad)  # as if it had passed the checksum
    with pytest.raises(data.DataFileError, match="austen.txt.gz.*cannot be decompressed") as e: data.austen_novels()
    assert not isinstance(e.value, gzip.BadGzipFile)
    cut = (data_copy/"austen.txt.gz").read_bytes()
    bad.write_bytes(cut[:len(cut)//2])  # a truncated stream: EOFError inside gzip
    with pytest.raises(data.DataFileError, match="cannot be decompressed"): data.austen_novels()


def test_pretrained_model_loads_with_no_network():
    code = ("import torch; from ptm_course.data import load_tokenizer, load_encoder\n"
            "tok = load_tokenizer(); model = load_encoder(device='cpu')\n"
            "out = model(**tok(['a fine film'], return_tensors='pt')).last_hidden_state\n"
            "assert out.shape[-1] == 384 and tok.vocab_size == 30522, (out.shape, tok.vocab_size)\n"
            "print('ok', sum(p.numel() for p in model.parameters()))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # any network attempt would fail
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) > 22_000_000


def test_unknown_model_gives_clear_error():
    with pytest.raises(OSError, match="Could not load pretrained model.*bundled MiniLM"):
        data.load_tokenizer("/no/such/folder")


@pytest.mark.cuda
def test_loaders_on_cuda():
    x, y = data.mnist_tensors(train=False, device="cuda", limit=1000)
    xb, yb = next(iter(data.DeviceLoader(x, y, batch_size=100)))
    assert xb.is_cuda and yb.is_cuda and xb.shape == (100, 1, 28, 28)
