"""The video-DiT attention study (arXiv 2504.10317) on a tiny random CogVideoX: the processor's
numerics against the stock one, exact sparsification, exact self-transfer, layer-local transfer,
reductions against the full softmax, sink flagging, restoring and argument checks."""

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from lantern.callbacks.vdit_attention import (
    CogVideoXStudyProcessor,
    MapReducer,
    VDiTAttention,
    reduce_attention,
    sparsify_rows,
    structure_similarity,
)
from lantern.errors import ConfigError
from lantern.lightning_modules.vdit_attention import (
    VDiTAttentionStudy,
    cogvideox_rotary_embedding,
    hashed_prompt_embedding,
    tiny_cogvideox,
)

ROOT = Path(__file__).resolve().parents[1]
FRAMES, SIZE, TEXT, DIM = 3, 8, 8, 16
N = TEXT + FRAMES * (SIZE // 2) ** 2  # 8 text + 48 video tokens


@pytest.fixture(scope="module")
def model():
    return tiny_cogvideox(0)


def forward(model, prompts=("a cat walks in the snow",), timestep=999, hooks=None):
    lat = torch.randn(len(prompts), FRAMES, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    emb = torch.stack([hashed_prompt_embedding(p, TEXT, DIM) for p in prompts])
    rope = cogvideox_rotary_embedding(model, FRAMES, SIZE, SIZE)
    with torch.no_grad():
        return model(hidden_states=lat, encoder_hidden_states=emb, timestep=torch.full((len(prompts),), timestep),
                     image_rotary_emb=rope, return_dict=False)[0]


def capture(model, names=("to_q", "to_k")):
    """Forward hooks keeping each layer's projection outputs and block outputs, per call."""
    seen, handles = {}, []
    for l, block in enumerate(model.transformer_blocks):
        for name in names:
            def keep(mod, args, out, key=(l, name)):
                seen.setdefault(key, []).append(out.detach().clone())
            handles.append(getattr(block.attn1, name).register_forward_hook(keep))
        handles.append(block.register_forward_hook(
            lambda mod, args, out, key=(l, "block"): seen.setdefault(key, []).append(out[0].detach().clone())))
    return seen, handles


def direct_softmax(model, layer, q_out, k_out):
    """softmax(q·kᵀ/√d) recomputed outside the processor: heads, norm_q/norm_k, RoPE on video tokens."""
    attn = model.transformer_blocks[layer].attn1
    b = q_out.shape[0]
    q = attn.norm_q(q_out.view(b, -1, attn.heads, 16).transpose(1, 2))
    k = attn.norm_k(k_out.view(b, -1, attn.heads, 16).transpose(1, 2))
    rope = cogvideox_rotary_embedding(model, FRAMES, SIZE, SIZE)
    q = torch.cat([q[:, :, :TEXT], apply_rotary_emb(q[:, :, TEXT:], rope)], dim=2)
    k = torch.cat([k[:, :, :TEXT], apply_rotary_emb(k[:, :, TEXT:], rope)], dim=2)
    return (q.double() @ k.double().transpose(-1, -2) / math.sqrt(16)).softmax(-1)


def test_no_feature_is_bit_identical_to_the_stock_processor(model):
    assert all(isinstance(p, CogVideoXAttnProcessor2_0) for p in model.attn_processors.values())
    stock = forward(model, ("a cat", "a red car at sunset"))
    for control in (VDiTAttention(), VDiTAttention(sparsity=0.0, transfer="off"),
                    VDiTAttention(record_layers="all", chunk_size=5)):  # recording only observes
        with control.applied(model):
            assert all(isinstance(p, CogVideoXStudyProcessor) for p in model.attn_processors.values())
            assert torch.equal(forward(model, ("a cat", "a red car at sunset")), stock)


def test_context_manager_restores_the_original_processors(model):
    before = dict(model.attn_processors)
    with pytest.raises(RuntimeError, match="inside"):
        with VDiTAttention(sparsity=0.5).applied(model):
            assert all(model.attn_processors[k] is not p for k, p in before.items())
            raise RuntimeError("inside")
    assert all(model.attn_processors[k] is p for k, p in before.items())
    study = VDiTAttention(sparsity=0.5)
    study.attach(model)
    study.attach(model)  # attaching twice must still remember the stock processors
    study.detach()
    assert all(model.attn_processors[k] is p for k, p in before.items())


@pytest.mark.parametrize("n", [7, 10, 56, 100])
@pytest.mark.parametrize("k", [0.1, 0.29, 0.5, 0.75, 0.99])
def test_sparsify_zeroes_exactly_floor_kn_of_the_smallest_per_row(n, k):
    probs = torch.rand(2, 3, 5, n, generator=torch.Generator().manual_seed(n)).softmax(-1)
    probs[0, 0, 0] = 1.0 / n  # a row of ties
    m = math.floor(Fraction(str(k)) * n)  # exact rational ⌊k·n⌋ (0.29·100 = 29, not 28)
    out = sparsify_rows(probs, k)
    zero = out == 0
    assert (zero.sum(-1) == m).all()
    assert torch.equal(out[~zero], probs[~zero])  # kept weights untouched
    if 0 < m < n:
        dropped = probs.masked_fill(~zero, -1).amax(-1)
        kept = probs.masked_fill(zero, 2).amin(-1)
        assert (dropped <= kept).all()  # the bottom ones were zeroed
    renorm = sparsify_rows(probs, k, renormalize=True)
    assert ((renorm == 0).sum(-1) == m).all() and torch.allclose(renorm.sum(-1), torch.ones(2, 3, 5))


def test_sparsifying_one_layer_zeroes_floor_kn_per_row_there_only(model):
    control = VDiTAttention(sparsity=0.3, sparsity_layers=[1], transfer="record", chunk_size=9)
    with control.applied(model):
        forward(model)
    zeros = {l: (control.maps[(l, 0)] == 0).sum(-1) for l in range(3)}
    assert (zeros[1] == math.floor(0.3 * N)).all()  # 16 of 56 keys per query row
    assert (zeros[0] == 0).all() and (zeros[2] == 0).all()
    assert set(control.sparsity_errors) == {1} and control.sparsity_errors[1][0].relative > 0


@pytest.mark.parametrize("map_dtype", [None, "bfloat16"])
def test_substituting_a_runs_own_maps_reproduces_it_exactly(model, map_dtype):
    record = VDiTAttention(transfer="record", map_dtype=map_dtype, chunk_size=20)
    with record.applied(model):
        outs = [forward(model, timestep=t) for t in (999, 500)]  # two denoising steps
    assert set(record.maps) == {(l, s) for l in range(3) for s in range(2)}
    substitute = VDiTAttention(transfer="substitute", maps=record.maps, chunk_size=20)
    with substitute.applied(model):
        assert all(torch.equal(forward(model, timestep=t), out) for t, out in zip((999, 500), outs))
    swapped = {(l, 1 - s): m for (l, s), m in record.maps.items()}  # the wrong step's maps do matter
    with VDiTAttention(transfer="substitute", maps=swapped, chunk_size=20).applied(model):
        assert not torch.allclose(forward(model, timestep=999), outs[0], atol=1e-5)


def test_transfer_touches_only_the_listed_layers(model):
    source, target = ("a red car drives along a coastal road",), ("a dog sleeps on a sofa",)
    record = VDiTAttention(transfer="record")
    with record.applied(model):
        forward(model, source)
    seen, handles = capture(model)
    own = forward(model, target)
    sub = VDiTAttention(transfer="substitute", transfer_layers=[1], maps=record.maps, record_layers=[2], n_query_samples=56)
    with sub.applied(model):
        edited = forward(model, target)
    only_1 = {key: m for key, m in record.maps.items() if key[0] == 1}
    with VDiTAttention(transfer="substitute", transfer_layers=[1], maps=only_1).applied(model):
        edited_only_1 = forward(model, target)
    for h in handles:
        h.remove()

    assert torch.equal(seen[(0, "block")][1], seen[(0, "block")][0])  # the layer before is untouched
    assert (edited - own).abs().max() > 1e-3  # the source's map in layer 1 changes the output
    assert torch.equal(edited, edited_only_1)  # cached maps of unlisted layers 0 and 2 are ignored
    # layer 2 attends with its own map, computed from its own q/k in the edited run
    mine = direct_softmax(model, 2, seen[(2, "to_q")][1], seen[(2, "to_k")][1]).float()
    assert torch.allclose(sub.reductions[2][0].samples, mine, atol=1e-5)
    assert not torch.allclose(record.maps[(2, 0)], mine, atol=1e-3)


def test_recorded_reductions_match_the_full_softmax(model):
    prompts = ("a cat walks in the snow", "waves crash on a lighthouse")
    control = VDiTAttention(record_layers="all", top_p=(0.05, 0.1, 0.5), sink_top_k=3, n_query_samples=10, chunk_size=7)
    seen, handles = capture(model)
    with control.applied(model):
        forward(model, prompts)
    for h in handles:
        h.remove()
    for l in range(3):
        probs = direct_softmax(model, l, seen[(l, "to_q")][0], seen[(l, "to_k")][0])
        (red,) = control.reductions[l]
        col = probs.mean(-2)
        assert torch.allclose(red.column_mass.double(), col, atol=1e-6)
        assert torch.allclose(red.sink_mass.double(), col.topk(3, dim=-1).values.sum(-1), atol=1e-6)
        ranked = probs.sort(-1, descending=True).values
        for i, p in enumerate((0.05, 0.1, 0.5)):
            top = ranked[..., : math.ceil(p * N)].sum(-1).mean(-1)
            assert torch.allclose(red.sparsity_profile[..., i].double(), top, atol=1e-6)
        rows = red.sample_rows
        assert len(rows) == 10 and len(set(rows.tolist())) == 10
        assert torch.allclose(red.samples.double(), probs[:, :, rows], atol=1e-6)
    again = VDiTAttention(record_layers=[0], n_query_samples=10)  # same seed → same rows for another prompt
    with again.applied(model):
        forward(model, ("a dog",))
    assert torch.equal(again.reductions[0][0].sample_rows, control.reductions[0][0].sample_rows)


def test_a_column_with_90_percent_of_the_mass_is_flagged_as_a_sink():
    q, n = 20, 30
    probs = torch.full((1, 2, q, n), 1.0 / n, dtype=torch.float64)
    probs[0, 0] = 0.1 / (n - 1)
    probs[0, 0, :, 5] = 0.9
    red = reduce_attention(probs, sink_top_k=1)
    assert [(b, h, j) for b, h, j, _ in red.sinks(0.3)] == [(0, 0, 5)]
    assert red.sink_mass[0, 0] == pytest.approx(0.9) and red.sink_columns[0, 0, 0] == 5
    assert red.sink_mass[0, 1] == pytest.approx(1.0 / n)
    chunked = MapReducer(1, 2, q, n, (0.1,), torch.tensor([3, 17]))
    for s in range(0, q, 6):
        chunked.update(probs[..., s:s + 6, :].float(), s)
    out = chunked.result(sink_top_k=1)
    assert [(b, h, j) for b, h, j, _ in out.sinks(0.3)] == [(0, 0, 5)]
    assert torch.allclose(out.samples, probs[:, :, [3, 17]].float())
    assert structure_similarity(out, out)[0, 0] == pytest.approx(1.0)  # (head 1 is constant: no correlation)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: VDiTAttention(sparsity=1.0), "VDiTAttention.sparsity=1.0: expected a value in [0, 1)"),
        (lambda: VDiTAttention(sparsity=-0.1), "VDiTAttention.sparsity=-0.1: expected a value in [0, 1)"),
        (lambda: VDiTAttention(transfer="substitute"), "VDiTAttention.maps=None: expected the maps of a run"),
        (lambda: VDiTAttention(top_p=(0.0,)), "VDiTAttention.top_p=[0.0]: expected fractions in (0, 1]"),
        (lambda: VDiTAttention(chunk_size=0), "VDiTAttention.chunk_size=0: expected ≥ 1"),
        (lambda: VDiTAttention(map_dtype="float13"), "VDiTAttention.map_dtype='float13'"),
        (lambda: VDiTAttention(record_layers="some"), "VDiTAttention.record_layers='some'"),
        (lambda: VDiTAttentionStudy(sparsity=[0.5, 1.0]), "model.sparsity=[0.5, 1.0]"),
        (lambda: VDiTAttentionStudy(transfer_layers=[3]), "layer 3 out of range"),
        (lambda: VDiTAttentionStudy(transformer="/no/such/dir"), "local diffusers CogVideoX directory"),
    ],
)
def test_bad_arguments_raise_a_one_line_value_error(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("spec", [{"sparsity": 0.5, "sparsity_layers": [3]}, {"record_layers": [-1]},
                                  {"transfer": "record", "transfer_layers": [0, 7]}])
def test_layer_out_of_range_fails_on_install_and_leaves_the_model_alone(model, spec):
    before = dict(model.attn_processors)
    with pytest.raises(ConfigError, match=r"expected layer indices in \[0, 3\): the transformer has 3 attention layers") as err:
        VDiTAttention(**spec).attach(model)
    assert "\n" not in str(err.value)
    assert all(model.attn_processors[k] is p for k, p in before.items())


@pytest.mark.slow
def test_the_tiny_study_writes_its_summary(tmp_path, monkeypatch):
    from lantern.cli import cli_main

    monkeypatch.chdir(tmp_path)
    cli = cli_main(["validate", "--config", str(ROOT / "configs/vdit_attention/cogvideox_tiny.yaml"),
                    "--data.init_args.limit", "1"])
    run = Path(cli.trainer.log_dir)
    summary = json.loads((run / "vdit_attention.json").read_text())
    assert summary["transfer"]["self_error"] == 0.0
    assert summary["transfer"]["target_change"] > 0
    assert len(summary["table"]) == 3 and all(-1 <= r["similarity"] <= 1 for r in summary["table"])
    assert (run / "vdit_attention.csv").read_text().startswith("layer,sink_mass,similarity")
    assert "| layer |" in (run / "vdit_attention.md").read_text()
    metrics = cli.trainer.callback_metrics
    assert {"vdit/sink_mass/L2", "vdit/similarity/L0", "vdit/sparsify_error/k0.5/L1"} <= set(metrics)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert "vdit/heatmap/sink_mass" in events.Tags()["images"]


def test_the_study_loads_a_local_diffusers_directory_without_downloading(tmp_path, model):
    from diffusers import CogVideoXDDIMScheduler

    model.save_pretrained(tmp_path / "transformer")
    CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing").save_pretrained(tmp_path / "scheduler")
    study = VDiTAttentionStudy(transformer=str(tmp_path), num_inference_steps=1, use_text_encoder=False)
    assert all(torch.equal(a, b) for a, b in zip(study.transformer.state_dict().values(), model.state_dict().values()))
    assert study._scheduler().config.prediction_type == "v_prediction"
    assert study.generate(study.embed("a cat")).shape == (1, FRAMES, 4, SIZE, SIZE)
