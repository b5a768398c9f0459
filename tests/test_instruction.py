"""InstructionDataModule with the byte tokenizer: masking, length limits, JSONL errors, data order."""

import json
from types import SimpleNamespace

import pytest
import torch

from lantern.datamodules.instruction import InstructionDataModule
from lantern.errors import ConfigError, DataError
from lantern.models.generation import render_prompt
from lantern.models.loading import load_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make(train, **kw):
    kw.setdefault("eval_tasks", [])
    kw.setdefault("tokenizer", "byte")
    return InstructionDataModule(train=str(train), **kw)


def test_labels_are_masked_exactly_on_prompt_and_padding(tmp_path):
    pairs = [{"prompt": "Say hi", "response": "hi"}, {"prompt": "Count to three", "response": "one two three"}]
    dm = make(write_jsonl(tmp_path / "p.jsonl", pairs), system="Be brief.", batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tok = load_tokenizer("byte")
    seen = []
    for row in range(2):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n = int(mask.sum())
        prompt_text = tok.decode(ids[:n].tolist()).split("Assistant:")[0] + "Assistant:"
        pair = next(p for p in pairs if render_prompt(tok, p["prompt"], "Be brief.") == prompt_text)
        n_prompt = len(prompt_text.encode())
        assert (labels[:n_prompt] == -100).all() and (labels[n:] == -100).all()
        assert labels[n_prompt:n].tolist() == ids[n_prompt:n].tolist() == list(pair["response"].encode()) + [tok.eos_token_id]
        assert (ids[n:] == tok.eos_token_id).all() and not mask[n:].any() and mask[:n].all()
        seen.append(pair["prompt"])
    assert sorted(seen) == sorted(p["prompt"] for p in pairs)
    assert batch["input_ids"].dtype == torch.long and batch["labels"].shape == batch["input_ids"].shape


def test_overlong_pairs_fail_naming_the_line_or_are_truncated_and_counted(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "x" * 300},
                                              {"prompt": "c", "response": "d"}])
    with pytest.raises(DataError, match=rf"{path}:2: \d+ tokens .* > data.max_length=64"):
        make(path, max_length=64).setup("fit")
    dm = make(path, max_length=64, overlong="truncate")
    dm.setup("fit")
    assert dm.truncated == 1
    assert "truncated 1 of 3 training pairs to max_length 64" in capsys.readouterr().err
    ids, labels = dm.train_set[1]
    assert len(ids) == 64 and labels[-1] == ord("x")  # cut on the response side, no eos
    long_prompt = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "y" * 100, "response": "b"}])
    with pytest.raises(DataError, match="prompt alone"):
        make(long_prompt, max_length=64, overlong="truncate").setup("fit")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a"', r":2: not valid JSON"),
    ('{"prompt": "a", "answer": "b"}', r":2: no field 'response' \(found \['answer', 'prompt'\]\); set data.response_field"),
    ('{"prompt": "a", "response": 3}', r":2: field 'response' must be a string"),
    ('[1, 2]', r":2: no field 'prompt'"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "ok", "response": "ok"}', line])
    with pytest.raises(DataError, match=str(path) + message):
        make(path).setup("fit")


def test_missing_or_unusable_sources_fail_at_configuration(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        make(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="InstructionDataModule.train"):
        make(tmp_path / "pairs.txt")
    with pytest.raises(ConfigError, match="InstructionDataModule.train='task:nope': expected task:NAME with NAME one of math"):
        make("task:nope")
    with pytest.raises(ConfigError, match="InstructionDataModule.eval_tasks"):
        make("task:math", eval_tasks=["math", "bogus"])
    with pytest.raises(DataError, match="no training pairs"):
        make(write_jsonl(tmp_path / "empty.jsonl", [""])).setup("fit")
    with pytest.raises(ConfigError, match="tokenizer"):
        make("task:math", tokenizer=None).setup("fit")


def test_task_training_and_validation_batches(tmp_path):
    dm = make("task:math", eval_tasks=["math:1", "safety"], n_train=40, n_eval=6, eval_batch_size=4, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_set) == 40
    loaders = dm.val_dataloader()
    assert dm.task_names == ["math:1", "safety"] and len(loaders) == 2
    batches = list(loaders[1])
    assert [b["task"] for b in batches] == ["safety", "safety"]
    assert [len(b["examples"]) for b in batches] == [4, 2]
    assert {e.group for b in batches for e in b["examples"]} == {"harmful", "benign"}
    first = next(iter(loaders[0]))["examples"][0]
    assert dm.tasks["math:1"].score([first], [first.response]).correct == [1.0]


def _order(dm, trainer=None):
    dm.trainer = trainer
    return [b["input_ids"][:, :40].tolist() for b in dm.train_dataloader()]


def test_training_order_is_seeded_and_resumes_where_it_stopped():
    dm = make("task:nlu", n_train=24, batch_size=4)
    dm.setup("fit")
    full = _order(dm)
    again = make("task:nlu", n_train=24, batch_size=4)
    again.setup("fit")
    assert _order(again) == full
    other = make("task:nlu", n_train=24, batch_size=4, seed=1)
    other.setup("fit")
    assert _order(other) != full
    resumed = SimpleNamespace(world_size=1, global_rank=0, global_step=2, accumulate_grad_batches=1, current_epoch=0,
                              is_global_zero=True)
    assert _order(dm, resumed) == full[2:]
