"""Offline tests of scripts/rebuild_data.py: the pure helpers and `--check` (no network)."""
import gzip
import importlib.util
import io
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "rebuild_data.py"
BUNDLED = REPO_ROOT / "ptm_course" / "bundled"


def load_script():
    spec = importlib.util.spec_from_file_location("rebuild_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rebuild_data = load_script()


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)


def test_deterministic_gzip_is_reproducible_with_no_name_and_mtime_0():
    data = b"pretrained models " * 1000
    first, second = rebuild_data.deterministic_gzip(data), rebuild_data.deterministic_gzip(data)
    assert first == second
    assert gzip.decompress(first) == data
    magic, method, flags, mtime = struct.unpack("<HBBI", first[:8])
    assert (magic, method) == (0x8B1F, 8)
    assert flags == 0  # no FNAME (or any other optional field)
    assert mtime == 0
    with gzip.GzipFile(fileobj=io.BytesIO(first)) as f:
        f.read()
        assert f.mtime == 0 and f.name == ""


def test_deterministic_gzip_matches_python_gzipfile():
    # The bundled MNIST files were written by GzipFile(filename="", mtime=0, compresslevel=9).
    data = bytes(range(256)) * 300
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
        f.write(data)
    assert rebuild_data.deterministic_gzip(data) == buffer.getvalue()


def write_mnist_csv(path, rows):
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    lines = [header] + [",".join(str(v) for v in (label, *pixels)) for label, pixels in rows]
    path.write_text("\n".join(lines) + "\n")


def test_csv_to_idx_headers_and_pixels(tmp_path):
    rows = [(7, [i % 256 for i in range(784)]), (0, [255 - (i % 256) for i in range(784)]),
            (9, [0] * 783 + [255])]
    csv_path = tmp_path / "tiny.csv"
    write_mnist_csv(csv_path, rows)
    images, labels = rebuild_data.csv_to_idx(csv_path)
    assert struct.unpack(">IIII", images[:16]) == (2051, 3, 28, 28)
    assert struct.unpack(">II", labels[:8]) == (2049, 3)
    assert len(images) == 16 + 3 * 784 and len(labels) == 8 + 3
    assert labels[8:] == bytes([7, 0, 9])
    assert images[16:] == b"".join(bytes(pixels) for _, pixels in rows)
    assert rebuild_data.idx_label_counts(labels) == (1, 0, 0, 0, 0, 0, 0, 1, 0, 1)


def test_csv_to_idx_rejects_a_bad_header_and_bad_values(tmp_path):
    bad_header = tmp_path / "bad_header.csv"
    bad_header.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="header"):
        rebuild_data.csv_to_idx(bad_header)
    bad_value = tmp_path / "bad_value.csv"
    write_mnist_csv(bad_value, [(3, [0] * 783 + [256])])
    with pytest.raises(ValueError, match="uint8"):
        rebuild_data.csv_to_idx(bad_value)


def test_austen_text_joins_novels_with_a_blank_line_and_no_final_newline():
    assert rebuild_data.austen_text([["EMMA", "", "By Jane Austen"], ["Persuasion", "THE END"]]) == \
        "EMMA\n\nBy Jane Austen\n\nPersuasion\nTHE END"


def test_sha256_file_and_sums_format(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert rebuild_data.sha256_file(path) == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  dir/x.bin\n"
                    "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD *y.bin\n")
    assert rebuild_data.read_sha256sums(sums) == {
        "dir/x.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "y.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}


needs_bundled = pytest.mark.skipif(not (BUNDLED / "SHA256SUMS").is_file(),
                                   reason="ptm_course/bundled is not there")


@pytest.fixture
def bundled_copy(tmp_path):
    copy = tmp_path / "bundled"
    shutil.copytree(BUNDLED, copy)
    return copy


@needs_bundled
def test_check_passes_on_the_bundled_data(bundled_copy):
    result = run_script("--check", str(bundled_copy))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and all(line.startswith("[OK] ") for line in lines)
    assert "[OK] austen.txt.gz" in lines
    assert rebuild_data.sha256sums_text(bundled_copy) == (bundled_copy / "SHA256SUMS").read_text()


@needs_bundled
@pytest.mark.parametrize("name", ["rotten_tomatoes_corpus_full.csv.bz2", "mnist/t10k-labels-idx1-ubyte.gz"])
def test_check_fails_on_a_flipped_byte(bundled_copy, name):
    path = bundled_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_script("--check", str(bundled_copy))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"[FAIL] {name}: sha256" in result.stdout
    assert sum(line.startswith("[FAIL]") for line in result.stdout.splitlines()) == 1


@needs_bundled
def test_check_catches_content_even_when_sha256sums_is_updated_to_match(bundled_copy):
    # Re-compressing different labels and "fixing" SHA256SUMS must still fail: the md5 of the
    # uncompressed IDX and the published sha256 are checked too.
    name = "mnist/t10k-labels-idx1-ubyte.gz"
    labels = bytearray(gzip.decompress((bundled_copy / name).read_bytes()))
    labels[8] = (labels[8] + 1) % 10
    (bundled_copy / name).write_bytes(rebuild_data.deterministic_gzip(bytes(labels)))
    (bundled_copy / "SHA256SUMS").write_text(rebuild_data.sha256sums_text(bundled_copy))
    result = run_script("--check", str(bundled_copy))
    assert result.returncode == 1
    fail_line = next(line for line in result.stdout.splitlines() if line.startswith("[FAIL]"))
    assert name in fail_line and "canonical MNIST" in fail_line and "published" in fail_line


def test_check_reports_a_missing_folder(tmp_path):
    result = run_script("--check", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "[FAIL] SHA256SUMS: missing" in result.stdout
    assert "[FAIL] austen.txt.gz: missing" in result.stdout


def test_help_documents_rdata_and_the_modes():
    result = run_script("--help")
    assert result.returncode == 0
    assert "pip install rdata" in result.stdout and "--target" in result.stdout
    assert "--check" in result.stdout and "--out" in result.stdout


def test_a_missing_gzip_is_reported_before_any_download(monkeypatch):
    which = shutil.which
    monkeypatch.setattr(rebuild_data.shutil, "which", lambda name: None if name == "gzip" else which(name))
    with pytest.raises(rebuild_data.RebuildError, match="GNU gzip"):
        rebuild_data.find_gnu_gzip()


def make_deb(path, files):
    """A minimal .deb (ar archive with a data.tar.xz) holding `files` {path: bytes}."""
    import tarfile
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    members = [(b"debian-binary", b"2.0\n"), (b"data.tar.xz", tar_buffer.getvalue())]
    blob = b"!<arch>\n"
    for name, content in members:
        blob += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 + b"100644".ljust(8) + \
            str(len(content)).encode().ljust(10) + b"`\n" + content + (b"\n" if len(content) % 2 else b"")
    path.write_bytes(blob)


def test_extract_deb_member_reads_the_data_tarball_without_dpkg(tmp_path):
    deb = tmp_path / "pkg.deb"
    make_deb(deb, {"usr/lib/R/site-library/janeaustenr/data/Rdata.rdb": b"rdb",
                   "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx": b"rdx",
                   "usr/share/doc/other": b"doc"})
    folder = rebuild_data.extract_deb_member(deb, rebuild_data.JANEAUSTENR_DATA, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["Rdata.rdb", "Rdata.rdx"]
    assert (folder / "Rdata.rdb").read_bytes() == b"rdb"
    assert not (tmp_path / "out" / "usr" / "share").exists()
