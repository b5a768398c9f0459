import csv
import json

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lantern import reporting

ROWS = [{"layer": 0, "score": 0.125, "name": "a"}, {"layer": 1, "score": 2.5, "name": "b"},
        {"layer": 2, "score": -1.0, "name": "c"}]


def _trainer(tmp_path, logger=True):
    tb = TensorBoardLogger(tmp_path, name="run") if logger else False
    return L.Trainer(accelerator="cpu", logger=tb, default_root_dir=tmp_path, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False)


def _events(trainer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer.logger.experiment.flush()
    return EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "tensors": 0}).Reload()


def test_a_table_goes_to_markdown_csv_json_and_tensorboard_text(tmp_path):
    trainer = _trainer(tmp_path)
    reporting.write_table(trainer, ROWS, "study", "study/table", step=3)
    run = tmp_path / "run" / "version_0"
    with (run / "study.csv").open(newline="") as fh:
        assert list(csv.DictReader(fh)) == [{k: str(v) for k, v in r.items()} for r in ROWS]
    lines = (run / "study.md").read_text().splitlines()
    assert lines[0] == "| layer | score | name |" and len(lines) == 2 + len(ROWS)
    assert lines[3] == "| 1 | 2.5 | b |"
    assert json.loads((run / "study.json").read_text()) == ROWS
    [text] = _events(trainer).Tensors("study/table/text_summary")
    assert text.step == 3 and "| 2 | -1 | c |" in text.tensor_proto.string_val[0].decode()


def test_a_payload_and_a_custom_markdown_replace_the_defaults(tmp_path):
    trainer = _trainer(tmp_path, logger=False)
    wide = reporting.pivot([{"task": "t", "p": p, "acc": p / 10} for p in (0, 5)] + [{"task": "u", "p": 5, "acc": 1.0}],
                           ["task"], "p", "acc", label="{}%")
    assert wide == [{"task": "t", "0%": 0.0, "5%": 0.5}, {"task": "u", "0%": "", "5%": 1.0}]
    reporting.write_table(trainer, ROWS, "study", "study/table", payload={"rows": ROWS, "extra": 1},
                          markdown=reporting.markdown_table(wide))
    assert json.loads((tmp_path / "study.json").read_text()) == {"rows": ROWS, "extra": 1}
    assert (tmp_path / "study.md").read_text().splitlines()[3] == "| u |  | 1 |"
    assert (tmp_path / "study.csv").read_text().startswith("layer,score,name")


def test_a_figure_goes_to_png_and_tensorboard_and_is_closed(tmp_path):
    plt = reporting.pyplot()
    trainer = _trainer(tmp_path)
    fig = reporting.heatmap(torch.rand(3, 4), "scores", vmin=0, vmax=1, xticks=["a", "b", "c", "d"])
    reporting.write_figure(trainer, fig, "study/heatmap", "heatmap")
    assert (tmp_path / "run" / "version_0" / "heatmap.png").stat().st_size > 0
    assert not plt.fignum_exists(fig.number)
    assert fig.axes[0].images[0].get_clim() == (0, 1)
    reporting.write_figure(trainer, reporting.line_plot(ROWS, "layer", "score"), "study/line")
    assert {"study/heatmap", "study/line"} <= set(_events(trainer).Tags()["images"])
    assert plt.get_fignums() == []


def test_line_plot_draws_a_line_per_group_in_a_panel_per_task():
    rows = [{"task": t, "def": d, "x": x, "y": x * (d == "b")} for t in ("t1", "t2") for d in "ab" for x in (2, 0, 1)]
    fig = reporting.line_plot(rows, "x", "y", line="def", panel="task", xlabel="% zeroed")
    assert [ax.get_title() for ax in fig.axes] == ["t1", "t2"] and fig.axes[0].get_xlabel() == "% zeroed"
    a, b = fig.axes[1].get_lines()
    assert (a.get_label(), list(b.get_xdata()), list(b.get_ydata())) == ("a", [0, 1, 2], [0, 1, 2])
    reporting.pyplot().close(fig)


def test_nothing_is_written_off_rank_zero_and_nothing_breaks_without_a_logger(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, logger=False)
    reporting.write_figure(trainer, reporting.heatmap([[0.5]], "one"), "study/heatmap")  # TensorBoard only: no-op
    reporting.write_figure(trainer, reporting.heatmap([[0.5]], "one"), "study/heatmap", "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png"]
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    other = tmp_path / "other"
    trainer = _trainer(other)
    reporting.write_table(trainer, ROWS, "study", "study/table")
    reporting.write_figure(trainer, reporting.heatmap([[0.5]], "one"), "study/heatmap", "one")
    assert not other.exists() and reporting.pyplot().get_fignums() == []



def test_rows_with_their_own_columns_share_one_header(tmp_path):
    trainer = _trainer(tmp_path, logger=False)
    rows = [{"task": "math", "score": 50.0}, {"task": "nlu", "score": 40.0, "topic": 45.0}]
    reporting.write_table(trainer, rows, "eval", "eval/table")
    with (tmp_path / "eval.csv").open(newline="") as fh:
        assert list(csv.DictReader(fh)) == [{"task": "math", "score": "50.0", "topic": ""},
                                            {"task": "nlu", "score": "40.0", "topic": "45.0"}]
    assert (tmp_path / "eval.md").read_text().splitlines()[0] == "| task | score | topic |"
