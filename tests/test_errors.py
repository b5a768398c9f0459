"""Every bad input ends in one line, ``lantern: error: …``, naming what to change; NaN never reaches a checkpoint.

The table goes through the real CLI entry (``cli_main``, the console script's function); a few
cases also run ``python cli.py`` to check what a user sees on stderr. Add a row for every
argument, file or setting a new method introduces.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lantern.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "configs/default_moe/tiny.yaml")
DEBUG = str(ROOT / "configs/debug/tiny.yaml")
FSDP = str(ROOT / "configs/strategy/fsdp.yaml")
STUDY = str(ROOT / "configs/dormant_heads/tiny.yaml")
LORI = ["fit", "--config", str(ROOT / "configs/lori/tiny.yaml")]
ALS = ["--config", str(ROOT / "configs/steering/als_smollm2.yaml"), "--model.init_args.model_name", "tiny-llama",
       "--data.init_args.shots", "0"]
FRIT = ["--config", str(ROOT / "configs/frit/pairs_smollm2.yaml"), "--model.init_args.model_name", "tiny-llama",
        "--data.init_args.shots", "0", "--data.init_args.n_calibration", "2"]
DPO = ["fit", "--config", str(ROOT / "configs/frit/dpo_smollm2.yaml"), "--model.init_args.model_name", "tiny-llama"]
PAIR = '{"prompt": "hi", "chosen": "a", "rejected": "b"}\n'
EM = ["validate", "--config", str(ROOT / "configs/em_icl/smollm2.yaml"), "--model.init_args.model_name", "tiny-llama",
      "--model.init_args.judge", "null"]
GUARD = ["fit", "--config", str(ROOT / "configs/guardian/sft_smollm2.yaml"), "--model.init_args.model_name", "tiny-llama"]
GUARD_ROW = '{"policy": ["No refunds."], "dialogue": [{"role": "user", "content": "hi"}, {"role": "agent", "content": "ok"}], '


@pytest.fixture(scope="module")
def run_ckpt(tmp_path_factory):
    """A finished 4-step run of the main recipe: (its last.ckpt, the folder it ran in)."""
    where = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        cli = cli_main(["fit", "--config", MAIN, "--config", DEBUG])
    return where / cli.trainer.log_dir / "checkpoints" / "last.ckpt"


def _write(path: Path, content) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _poisoned(ckpt: Path, to: Path) -> str:
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["model.norm.weight"][0] = float("nan")
    torch.save(state, to)
    return str(to)


def _word_tokenizer(t: Path) -> str:
    """A real Hugging Face tokenizer folder that is not the byte tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "the": 2, "cat": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  unk_token="<unk>", eos_token="<eos>")
    tok.save_pretrained(t / "tok")
    return str(t / "tok")


def _callbacks(t: Path, body: str) -> str:
    return _write(t / "callbacks.yaml", f"trainer:\n  callbacks:\n    - {body}\n")


FIT = ["fit", "--config", MAIN]
CASES = {
    # values on the command line
    "negative lr": (lambda t, c: FIT + ["--model.init_args.optim.lr", "-1e-3"], "model.init_args.optim.lr=-0.001: expected"),
    "lr not a number": (lambda t, c: FIT + ["--model.init_args.optim.lr", "fast"], "optim.lr"),
    "lr where optim.lr is": (lambda t, c: FIT + ["--model.init_args.lr=-1"], "'lr' is not accepted"),
    "unknown trainer key": (lambda t, c: FIT + ["--trainer.max_stepz", "3"], "max_stepz"),
    "n_heads 0": (lambda t, c: FIT + ["--model.init_args.model.init_args.n_heads", "0"], "model.init_args.model.init_args.n_heads=0"),
    "negative d_model": (lambda t, c: FIT + ["--model.init_args.model.init_args.d_model", "-8"], "model.init_args.model.init_args.d_model=-8"),
    "d_expert 0": (lambda t, c: FIT + ["--model.init_args.model.init_args.d_expert", "0"], "d_expert=0"),
    "top_k > n_experts": (lambda t, c: FIT + ["--model.init_args.model.init_args.top_k", "9"], "top_k=9: expected between 1 and n_experts=8"),
    "unknown router": (lambda t, c: FIT + ["--model.init_args.model.init_args.router_mode", "soft"], "router_mode"),
    "block longer than the model": (lambda t, c: FIT + ["--data.init_args.block_size", "512"], "data.init_args.block_size=512: expected ≤ the model's max_seq_len=256"),
    "negative max_steps": (lambda t, c: FIT + ["--trainer.max_steps", "-5"], "trainer.max_steps=-5"),
    "max_steps 0": (lambda t, c: FIT + ["--trainer.max_steps", "0"], "trainer.max_steps=0"),
    "bad betas": (lambda t, c: FIT + ["--model.init_args.optim.betas", "[0.9, 1.5]"], "model.init_args.optim.betas=[0.9, 1.5]"),
    "negative num_workers": (lambda t, c: FIT + ["--data.init_args.num_workers", "-1"], "data.init_args.num_workers=-1"),
    "negative clip": (lambda t, c: FIT + ["--trainer.gradient_clip_val", "-1"], "trainer.gradient_clip_val=-1"),
    "no validation but a monitor": (lambda t, c: FIT + ["--trainer.limit_val_batches", "0"], "trainer.limit_val_batches=0"),
    "max_skips 0": (lambda t, c: FIT + ["--nonfinite.max_skips", "0"], "nonfinite.max_skips=0: expected ≥ 1"),
    "predict without a predict step": (lambda t, c: ["predict", "--config", MAIN], "MoEPretraining has no predict step"),
    # data
    "empty source": (lambda t, c: FIT + ["--data.init_args.source", ""], "data.source is empty"),
    "missing source": (lambda t, c: FIT + ["--data.init_args.source", "/no/such/corpus.txt"], "/no/such/corpus.txt'"),
    "binary jsonl": (lambda t, c: FIT + ["--data.init_args.source", _write(t / "bin.jsonl", b"\xff\xfe\x00bad")], "bin.jsonl:1: not UTF-8"),
    "empty tokenizer folder": (lambda t, c: FIT + ["--data.init_args.tokenizer", str(t)], "could not load '{t}'"),
    "unwritable cache": (lambda t, c: FIT + ["--data.init_args.cache_dir", str(Path(_write(t / "f", "x")) / "c")], "data.init_args.cache_dir="),
    "unwritable run folder": (lambda t, c: FIT + ["--trainer.logger.init_args.save_dir", str(Path(_write(t / "f", "x")) / "runs")],
                              "trainer.logger.init_args.save_dir="),
    # config files
    "empty config": (lambda t, c: FIT + ["--config", _write(t / "e.yaml", "")], "e.yaml: the file is empty"),
    "binary config": (lambda t, c: FIT + ["--config", _write(t / "b.yaml", b"\x00\xff\x13\x88" * 8)], "b.yaml: not a text YAML file"),
    "YAML syntax error": (lambda t, c: FIT + ["--config", _write(t / "s.yaml", "trainer:\n  max_steps: [1,\n")], "s.yaml: line 3"),
    "duplicate YAML key": (lambda t, c: FIT + ["--config", _write(t / "d.yaml", "trainer:\n  max_steps: 3\n  max_steps: 4\n")],
                           "d.yaml: line 3, column 3: invalid YAML (key 'max_steps' appears twice)"),
    "config not a mapping": (lambda t, c: FIT + ["--config", _write(t / "l.yaml", "- 1\n- 2\n")], "l.yaml: expected a mapping"),
    "missing config": (lambda t, c: FIT + ["--config", str(t / "nope.yaml")], "nope.yaml: no such file"),
    # checkpoints
    "missing checkpoint (fit)": (lambda t, c: FIT + ["--ckpt_path", str(t / "x.ckpt")], "x.ckpt: no such checkpoint file"),
    "missing checkpoint (validate)": (lambda t, c: ["validate", "--ckpt_path", str(t / "x.ckpt")], "x.ckpt: no such checkpoint file"),
    "empty checkpoint": (lambda t, c: FIT + ["--ckpt_path", _write(t / "e.ckpt", b"")], "e.ckpt: the file is empty"),
    "random-bytes checkpoint": (lambda t, c: ["validate", "--config", MAIN, "--ckpt_path", _write(t / "r.ckpt", bytes(range(256)) * 8)],
                                "r.ckpt: not a readable checkpoint"),
    "truncated checkpoint": (lambda t, c: ["validate", "--config", MAIN, "--ckpt_path", _write(t / "t.ckpt", c.read_bytes()[:5000])],
                             "t.ckpt: not a readable checkpoint"),
    "checkpoint of another size (validate)": (lambda t, c: ["validate", "--ckpt_path", str(c), "--model.init_args.model.init_args.d_model", "64"],
                                              "model.embed.weight is [257, 128] in the checkpoint and [257, 64] in the model"),
    "checkpoint of another size (fit)": (lambda t, c: FIT + ["--ckpt_path", str(c), "--model.init_args.model.init_args.n_layers", "2"],
                                         "does not fit MoEPretraining"),
    "checkpoint holding NaN": (lambda t, c: ["validate", "--config", MAIN, "--ckpt_path", _poisoned(c, t / "nan.ckpt")],
                               "nan.ckpt: NaN or inf in 1 of "),
    "checkpoint without its run": (lambda t, c: ["validate", "--ckpt_path", _write(t / "alone.ckpt", c.read_bytes())], "no config.yaml found above"),
    "folder that is no sharded checkpoint": (lambda t, c: FIT + ["--ckpt_path", str(t)], "{t}: a folder, but not a sharded checkpoint (no meta.pt"),
    # strategies
    **({} if torch.cuda.is_available() else {
        "FSDP overlay without CUDA": (lambda t, c: FIT + ["--config", FSDP],
                                      "fsdp.yaml asks for trainer.accelerator=gpu) and this machine has none"),
    }),
    # studies and callbacks
    "model that is not there": (lambda t, c: ["validate", "--config", STUDY, "--model.init_args.model_name", "someone/not-a-model"],
                                "could not load 'someone/not-a-model'"),
    "tokenizer other than the model's": (lambda t, c: ["validate", "--config", STUDY, "--data.init_args.tokenizer", _word_tokenizer(t)],
                                         "data.init_args.tokenizer='{t}/tok': expected the model's tokenizer 'tiny-llama'"),
    "zero accumulation": (lambda t, c: FIT + ["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches=0"),
    "validation every 0 steps": (lambda t, c: FIT + ["--trainer.val_check_interval", "0"], "trainer.val_check_interval=0"),
    "no training batches": (lambda t, c: FIT + ["--trainer.limit_train_batches", "0"], "trainer.limit_train_batches=0"),
    "duplicate key through -c": (lambda t, c: ["fit", "-c", MAIN, "-c", _write(t / "d.yaml", "trainer:\n  max_steps: 3\n  max_steps: 4\n")],
                                 "appears twice"),
    "fraction out of range": (lambda t, c: ["validate", "--config", STUDY, "--model.init_args.fractions", "[0.1, 1.5]"], "model.init_args.fractions="),
    "unknown task": (lambda t, c: ["validate", "--config", STUDY, "--data.init_args.tasks", "[hellaswag]"], "data.init_args.tasks='hellaswag'"),
    "head out of range": (lambda t, c: ["validate", "--config", STUDY, "--config", _callbacks(t, "class_path: lantern.callbacks.HeadAblation\n      init_args: {heads: [[9, 0]]}")],
                          "trainer.callbacks[0].init_args.heads="),
    "invalid regex": (lambda t, c: ["validate", "--config", STUDY, "--config", _callbacks(t, "class_path: lantern.callbacks.ActivationCache\n      init_args: {names: '('}")],
                      "trainer.callbacks[0].init_args.names='('"),
    "no sites": (lambda t, c: ["validate", "--config", STUDY, "--config", _callbacks(t, "class_path: lantern.callbacks.ActivationCache\n      init_args: {sites: []}")],
                 "trainer.callbacks[0].init_args.sites=[]"),
    "top_k beyond the sequence": (lambda t, c: ["validate", "--config", STUDY, "--config", _callbacks(t, "class_path: lantern.callbacks.SinkMeasurement\n      init_args: {top_k: 5000}")],
                                  "top_k=5000"),
    # adapters and instruction data
    "LoRI-S without a LoRI-D run": (lambda t, c: LORI + ["--model.init_args.variant", "lori_s"],
                                    "model.init_args.mask_from=None: expected the adapter directory of a LoRI-D run"),
    "adapter folder that is not there": (lambda t, c: LORI + ["--model.init_args.init_from", str(t / "none")], "model.init_args.init_from='{t}/none'"),
    "sparsity 1": (lambda t, c: LORI + ["--model.init_args.sparsity", "1.0"], "model.init_args.sparsity=1.0"),
    "rank 0": (lambda t, c: LORI + ["--model.init_args.rank", "0"], "model.init_args.rank=0"),
    "projection the model lacks": (lambda t, c: LORI + ["--model.init_args.target_modules", "[qkv]"],
                                   "model.init_args.target_modules=['qkv']: expected projection names"),
    "missing pairs file": (lambda t, c: LORI + ["--data.init_args.train", str(t / "pairs.jsonl")], "{t}/pairs.jsonl"),
    "pairs without a response": (lambda t, c: LORI + ["--data.init_args.train", _write(t / "p.jsonl", '{"prompt": "hi"}\n')], "p.jsonl:1"),
    "unknown evaluation task": (lambda t, c: LORI + ["--data.init_args.eval_tasks", "[poetry]"], "poetry"),
    "pair longer than max_length": (lambda t, c: LORI + ["--data.init_args.overlong", "error", "--data.init_args.max_length", "16"], "max_length"),
    # steering
    "steering layer beyond the model": (lambda t, c: ["fit", *ALS, "--model.init_args.layer", "5"], "model.init_args.layer=5"),
    "cosine threshold out of range": (lambda t, c: ["fit", *ALS, "--model.init_args.tau", "3"], "model.init_args.tau=3.0"),
    "missing steering vector": (lambda t, c: ["validate", *ALS, "--model.init_args.vector_path", str(t / "v.safetensors")],
                                "model.init_args.vector_path='{t}/v.safetensors'"),
    "steering vector that is not one": (lambda t, c: ["validate", *ALS, "--model.init_args.vector_path", _write(t / "v.safetensors", "junk")],
                                        "v.safetensors: not a safetensors file"),
    "validate before calibrating": (lambda t, c: ["validate", *ALS, "--model.init_args.methods", "[als]"], "run fit (the calibration) first"),
    "missing problems file": (lambda t, c: ["fit", *ALS, "--data.init_args.calibration", str(t / "gsm.jsonl"),
                                            "--data.init_args.evaluation", str(t / "gsm.jsonl")], "{t}/gsm.jsonl': no such file"),
    "problems without their fields": (lambda t, c: ["fit", *ALS, "--data.init_args.calibration", _write(t / "p.jsonl", '{"q": "1+1"}\n' * 3),
                                                    "--data.init_args.evaluation", str(t / "p.jsonl"), "--data.init_args.n_calibration", "2",
                                                    "--data.init_args.n_eval", "1"], "p.jsonl:1: no question/answer, problem/solution or Body/Question/Answer fields"),
    # FRIT and DPO
    "FRIT without the step format": (lambda t, c: ["predict", *FRIT, "--data.init_args.answer_format", "text"],
                                     "data.answer_format='text': expected 'steps'"),
    "FRIT ramp without tries": (lambda t, c: ["predict", *FRIT, "--model.init_args.ramp", "[]"], "model.init_args.ramp=[]"),
    "FRIT pairs file of other settings": (lambda t, c: ["predict", *FRIT, "--model.init_args.pairs_path",
                                                        _write(t / "pairs.jsonl", '{"id": "x", "settings": {"model": "m"}}\n')],
                                          "model.init_args.pairs_path='{t}/pairs.jsonl': expected a pairs file written with these settings"),
    "FRIT comparison model that is not there": (lambda t, c: ["validate", *FRIT, "--model.init_args.compare", f"[{t}/model]"],
                                                "model.init_args.compare='{t}/model': expected a saved model folder"),
    "unknown problem source": (lambda t, c: ["predict", *FRIT, "--data.init_args.calibration", "gsm8k"],
                               "data.init_args.calibration='gsm8k': expected math:D (D in 1..5), facts,"),
    "DPO pairs file that is not there": (lambda t, c: DPO + ["--data.init_args.train", str(t / "none.jsonl")], "{t}/none.jsonl': no such file"),
    "DPO pairs without references": (lambda t, c: DPO + ["--data.init_args.train", _write(t / "p.jsonl", PAIR * 4)],
                                     "model.init_args.reference='precomputed': expected pairs that carry ref_chosen"),
    "DPO pair without its rejected reply": (lambda t, c: DPO + ["--data.init_args.train", _write(t / "p.jsonl", '{"prompt": "hi", "chosen": "a"}\n' * 3)],
                                            "p.jsonl:1: no field 'rejected'"),
    "DPO beta 0": (lambda t, c: DPO + ["--model.init_args.beta", "0"], "model.init_args.beta=0"),
    "DPO LoRA on a projection the model lacks": (lambda t, c: DPO + ["--model.init_args.lora", "{target_modules: [qkv]}",
                                                                     "--data.init_args.train", _write(t / "p.jsonl", PAIR * 4)],
                                                 "model.init_args.lora.target_modules=['qkv']: expected projection names"),
    "DPO held-out share 1": (lambda t, c: DPO + ["--data.init_args.val_fraction", "1", "--data.init_args.train", _write(t / "p.jsonl", PAIR * 4)],
                             "data.init_args.val_fraction=1"),
    # emergent misalignment from many-shot ICL
    "EM variant that does not exist": (lambda t, c: EM + ["--data.init_args.variants", "[loud]"], "data.init_args.variants=['loud']"),
    "EM dataset that is not there": (lambda t, c: EM + ["--data.init_args.datasets", f"[{t}/none.jsonl]"],
                                     "'{t}/none.jsonl' is not a file"),
    "EM pairs without the assistant turn": (lambda t, c: EM + ["--data.init_args.datasets", "[" + _write(t / "p.jsonl", '{"user": "hi"}') + "]"],
                                            "p.jsonl:1: expected non-empty text fields 'user' and 'assistant'"),
    "EM k beyond the dataset": (lambda t, c: EM + ["--data.init_args.ks", "[500]"], "k = 500 but builtin:finance has"),
    "EM answers of a run that is not there": (lambda t, c: EM + ["--model.init_args.answers_from", str(t / "a.jsonl")],
                                              "model.init_args.answers_from='{t}/a.jsonl'"),
    "EM guardian judge without a coherence judge": (lambda t, c: EM + ["--model.init_args.judge.class_path", "lantern.lightning_modules.GuardianJudge",
                                                                       "--model.init_args.judge.init_args.model_name", "tiny-llama"],
                                                    "coherence_judge='GuardianJudge': expected a judge that follows a rubric"),
    "EM HTTP judge without its key": (lambda t, c: EM + ["--model.init_args.judge.class_path", "lantern.models.judge.HTTPJudge",
                                                         "--model.init_args.judge.init_args.base_url", "http://127.0.0.1:9/v1",
                                                         "--model.init_args.judge.init_args.model", "m",
                                                         "--model.init_args.judge.init_args.api_key_env", "LANTERN_NO_SUCH_KEY"],
                                      "api_key_env='LANTERN_NO_SUCH_KEY'"),
    # guardians
    "guardian mode that does not exist": (lambda t, c: GUARD + ["--data.init_args.mode", "slow"], "mode"),
    "guardian data that is not there": (lambda t, c: GUARD + ["--data.init_args.train", f"[{t}/g.jsonl]"], "'{t}/g.jsonl': expected builtin:train"),
    "guardian label that is neither": (lambda t, c: GUARD + ["--data.init_args.train", "[" + _write(t / "g.jsonl", GUARD_ROW + '"label": "MAYBE"}') + "]"],
                                       "g.jsonl:1: label 'MAYBE' is not PASS or FAIL"),
    "guardian GRPO with one reply per group": (lambda t, c: GUARD + ["--model.init_args.grpo", "{group_size: 1}"], "grpo.group_size=1"),
    "guardian FPR target of one": (lambda t, c: GUARD + ["--model.init_args.target_fpr", "1"], "model.init_args.target_fpr=1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_in_one_line_naming_the_field(case, run_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build, expected = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    with pytest.raises(SystemExit) as exit_:
        cli_main(build(inputs, run_ckpt))
    said = exit_.value.code
    assert isinstance(said, str) and said.startswith("lantern: error: ") and "\n" not in said, said
    assert expected.replace("{t}", str(inputs)) in said, said
    assert not list(tmp_path.glob("runs/*/version_*")), "a failed run left its folder behind"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected, alone",
    [
        (["fit", "--config", MAIN, "--model.init_args.model.init_args.n_heads", "0"], "n_heads=0", True),
        (["validate", "--ckpt_path", "missing.ckpt"], "missing.ckpt: no such checkpoint file", True),
        (["fit", "-c", MAIN, "--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches=0", True),
        (["validate", "--config", STUDY, "--model.init_args.model_name", "someone/not-a-model"], "could not load", True),
    ],
)
def test_the_console_shows_one_line_and_no_traceback(args, expected, alone, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert lines[-1].startswith("lantern: error: ") and expected in lines[-1]
    assert not alone or len(lines) == 1, proc.stderr


def test_a_diverging_run_stops_and_names_a_finite_checkpoint(tmp_path, monkeypatch):
    """The reported case: lr 1e6 used to leave best-2.ckpt and last.ckpt with NaN in 35 of 39 tensors."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", MAIN, "--config", DEBUG, "--model.init_args.optim.lr", "1e6", "--trainer.val_check_interval", "1"])
    said = exit_.value.code
    assert said.startswith("lantern: error: non-finite gradients") and "the last finite checkpoint is " in said
    named = Path(said.rsplit("the last finite checkpoint is ", 1)[1])
    state = torch.load(named, weights_only=True)
    tensors = list(state["state_dict"].values())
    tensors += [v for opt in state["optimizer_states"] for s in opt["state"].values() for v in s.values()]
    assert all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point())
    for ckpt in tmp_path.rglob("*.ckpt"):  # and nothing else written is poisoned either
        sd = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


@pytest.mark.slow
def test_a_failed_run_keeps_the_folder_it_did_not_make(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(["validate", "--config", STUDY, "--data.init_args.text_blocks", "2"])
    run = tmp_path / "runs/dormant_heads_tiny/version_0"
    assert (run / "dormant_heads.csv").is_file()
    with pytest.raises(SystemExit, match="no such file"):
        cli_main(["validate", "--config", STUDY, "--trainer.logger.init_args.version", "0",
                  "--data.init_args.tasks", "[mmlu:/no/such/mmlu.jsonl]"])
    assert (run / "dormant_heads.csv").is_file()
    assert (tmp_path / "runs/dormant_heads_tiny/latest").resolve() == run
