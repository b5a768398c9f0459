import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Caches (packed data, de-quantised models) go to a per-session folder, never ~/.cache."""
    old = os.environ.get("LANTERN_CACHE")
    os.environ["LANTERN_CACHE"] = str(tmp_path_factory.mktemp("lantern-cache"))
    yield
    if old is None:
        os.environ.pop("LANTERN_CACHE", None)
    else:
        os.environ["LANTERN_CACHE"] = old


@pytest.fixture(autouse=True)
def _reset_torch_state():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def corpus(tmp_path):
    """A small local corpus: 40 text files of distinct, real-looking prose."""
    root = tmp_path / "corpus"
    root.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    for i in range(40):
        line = " ".join(words[(i + j) % len(words)] for j in range(60))
        (root / f"doc{i:02d}.txt").write_text(f"Document {i}.\n" + (line + "\n") * 4)
    return root
