"""pytest setup shared by the library tests and the notebooks that nbval runs.

Notebook kernels are started by nbval after this file is imported, so the environment set here
reaches them too: fast mode, no hub access, and a fresh cache so a run never depends on (or
damages) what an earlier run left in the user's cache."""
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("PTM_FAST", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # the course must never need the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# OpenMP threads that spin while waiting make every small tensor operation ~1000x slower when
# other processes (a notebook kernel, torchrun's workers, a grader's kernels) share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "PTM_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="ptm-course-test-cache-")
    os.environ["PTM_CACHE_DIR"] = _cache
else:
    _cache = None


def pytest_collection_modifyitems(config, items):
    import torch
    fast = os.environ.get("PTM_FAST", "").lower() in {"1", "true", "yes", "on"}
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    skip_slow = pytest.mark.skip(reason="full-size work: run with PTM_FAST=0")
    for item in items:
        cell = getattr(item, "cell", None)  # an nbval notebook cell
        if cell is not None and cell.get("execution_count") is None and cell.get("outputs"):
            # nbdev-clean drops execution counts but keeps outputs, which nbval would take for an
            # unrun cell with stale outputs; under --nbval-lax outputs are documentation, not references.
            cell["execution_count"] = 0
        if "cuda" in item.keywords and not torch.cuda.is_available(): item.add_marker(skip_cuda)
        if "slow" in item.keywords and fast: item.add_marker(skip_slow)


def pytest_sessionfinish(session, exitstatus):
    if _cache: shutil.rmtree(_cache, ignore_errors=True)
