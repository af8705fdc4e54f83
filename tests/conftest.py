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
