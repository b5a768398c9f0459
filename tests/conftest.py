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


def peaked(model):
    """A random tiny model's logits are nearly uniform (float noise between padded and unpadded runs
    could flip argmax ties), and scaling its tied embedding only makes it echo its input. An untied
    N(0, 1) output projection gives varied text with the top token at ~0.75 probability."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    return model


@pytest.fixture(scope="module")
def tok():
    """The byte-level tokenizer of the tiny models."""
    from lantern.models import load_tokenizer

    return load_tokenizer("byte")


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama whose greedy choices are clear-cut (``peaked``)."""
    from lantern.models import load_model

    return peaked(load_model("tiny-llama", seed=0))
