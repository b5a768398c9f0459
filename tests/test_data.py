import json

import numpy as np
import pytest
import torch

from lantern.datamodules.text import DataError, ResumableSampler, TextDataModule, _is_val


def _dm(source, tmp_path, **kw):
    args = dict(source=str(source), block_size=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    return TextDataModule(**(args | kw))


def test_packing_keeps_every_token_in_document_order(corpus, tmp_path):
    dm = _dm(corpus, tmp_path)
    dm.setup("fit")
    for split, ds in (("train", dm.train_set), ("val", dm.val_set)):
        docs = sorted(p for p in corpus.iterdir() if _is_val(str(p), 0.2) == (split == "val"))
        stream = np.concatenate([np.frombuffer(p.read_bytes(), np.uint8).astype(np.int64).tolist() + [256] for p in docs])
        packed = np.asarray(ds.blocks).reshape(-1)
        assert len(packed) == (len(stream) // 33) * 33 > 0
        assert np.array_equal(packed, stream[: len(packed)])
    item = dm.train_set[0]
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])


def test_split_is_deterministic_and_disjoint(corpus, tmp_path):
    a, b = _dm(corpus, tmp_path / "a"), _dm(corpus, tmp_path / "b")
    a.setup("fit"), b.setup("fit")
    assert np.array_equal(a.train_set.blocks, b.train_set.blocks)
    assert a.meta["train"]["documents"] + a.meta["val"]["documents"] == 40
    assert 0 < a.meta["val"]["documents"] < 40


def test_cache_is_reused(corpus, tmp_path, monkeypatch):
    dm = _dm(corpus, tmp_path)
    dm.prepare_data()
    monkeypatch.setattr(TextDataModule, "_build", lambda *a: pytest.fail("rebuilt a cached corpus"))
    dm2 = _dm(corpus, tmp_path)
    dm2.prepare_data()
    dm2.setup("fit")
    assert isinstance(dm2.train_set.blocks, np.memmap)


def test_jsonl_source_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"record number {i} " * 20}) for i in range(30)))
    dm = _dm(path, tmp_path, text_field="body")
    dm.setup("fit")
    assert dm.meta["train"]["documents"] + dm.meta["val"]["documents"] == 30


def test_stdlib_corpus_is_real_and_sizeable(tmp_path):
    dm = _dm("stdlib", tmp_path, block_size=256, max_documents=50)
    dm.setup("fit")
    text = bytes(np.asarray(dm.train_set.blocks[:4]).reshape(-1).astype(np.uint8)[:2000].tolist()).decode("utf-8", "replace")
    assert "def " in text or "import " in text


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ('{"text": "ok"}\n{"text": broken}\n', {}, r"d\.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', {}, r"d\.jsonl:2: no field 'text'"),
        ('{"text": 3}\n', {}, r"d\.jsonl:1: field 'text' must be a string"),
        ("\n\n", {}, "corpus is empty"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, content, kwargs, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        _dm(path, tmp_path, **kwargs).setup("fit")


def test_missing_source_and_too_small_corpus(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        _dm(tmp_path / "nope.txt", tmp_path).setup("fit")
    tiny = tmp_path / "t.txt"
    tiny.write_text("short")
    with pytest.raises(DataError, match="fewer than one block"):
        _dm(tiny, tmp_path).setup("fit")


def test_sampler_resumes_mid_epoch_and_shards_by_rank():
    data = list(range(40))
    full = list(ResumableSampler(data, 1, 0, seed=3))
    s = ResumableSampler(data, 1, 0, seed=3)
    s.resume_at(epoch=0, samples=12)
    assert list(s) == full[12:] and len(s) == 28
    s.set_epoch(1)  # the skip applies to the resumed epoch only
    assert len(list(s)) == 40 and list(s) != full
    r0, r1 = list(ResumableSampler(data, 2, 0, seed=3)), list(ResumableSampler(data, 2, 1, seed=3))
    assert sorted(r0 + r1) == data


def test_hf_source_goes_through_datasets_load_dataset(tmp_path):
    local = tmp_path / "local_dataset"
    local.mkdir()
    (local / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i} " * 30}) for i in range(25)))
    dm = _dm(f"hf:{local}", tmp_path)
    dm.setup("fit")
    assert dm.meta["train"]["documents"] + dm.meta["val"]["documents"] == 25
    with pytest.raises(DataError, match="no field 'body'"):
        _dm(f"hf:{local}", tmp_path, text_field="body").setup("fit")
    with pytest.raises(DataError, match=r"hf:.*could not load"):
        _dm(f"hf:{tmp_path / 'absent'}", tmp_path).setup("fit")
