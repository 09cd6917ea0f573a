import os
import random
from pathlib import Path

import numpy as np
import pytest

FASHION_DIR = Path(os.environ.get("HCDIAG_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def fashion_dir():
    """Folder of the Debian package dataset-fashion-mnist; under CI=true missing files FAIL."""
    missing = [f for f in FASHION_FILES if not (FASHION_DIR / f).exists()]
    if missing:
        msg = f"Fashion-MNIST files missing in {FASHION_DIR}: {missing} (apt-get install dataset-fashion-mnist)"
        if _in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return FASHION_DIR


@pytest.fixture
def seed():
    """A random seed per test run (printed on failure); set HCDIAG_TEST_SEED to replay one."""
    s = int(os.environ.get("HCDIAG_TEST_SEED", random.SystemRandom().randrange(2**31)))
    np.random.seed(s % (2**32))
    try:
        import torch

        torch.manual_seed(s)
    except ImportError:  # pragma: no cover
        pass
    print(f"HCDIAG_TEST_SEED={s}")
    return s


@pytest.fixture(autouse=True)
def _headless_matplotlib(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    yield
    try:
        import matplotlib.pyplot as plt

        plt.close("all")
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is ~10x faster than several on a busy shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
