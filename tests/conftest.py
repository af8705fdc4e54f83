import sys
from pathlib import Path

import pytest
import torch

# Let the tests import their shared builders (tests/helpers.py).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over a lazy dog while seven wizards box nightly".split()
    for i in range(12):
        lines = [" ".join(words[(i + j * k) % len(words)] for k in range(9)) for j in range(120)]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root
