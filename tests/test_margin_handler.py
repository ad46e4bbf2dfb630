import csv
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine, Events

from monai_amat.handlers import MarginHandler, label_has_foreground
from monai_amat.keys import AttackEvents


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_histogram(self, tag, values, step):
        self.calls.append((tag, values.clone(), step))


def _engine(handler, batches):
    """A bare Ignite engine that replays attack results through the handler's events."""

    def step(engine, batch):
        engine.state.output = batch
        engine.fire_event(AttackEvents.ATTACK_COMPLETED)
        return batch

    engine = Engine(step)
    engine.register_events(*AttackEvents)
    handler.attach(engine)
    handler.attach(engine)  # attaching twice registers once
    return engine


def _batch(index, found, norm):
    n = len(index)
    return {
        "index": torch.tensor(index),
        "found": torch.tensor(found),
        "noise_norm": torch.tensor(norm),
        "boundary_norm": torch.tensor(norm),
        "clean_correct": torch.ones(n, dtype=torch.bool),
    }


def test_handler_writes_csv_stats_and_histogram(tmp_path):
    writer = FakeWriter()
    handler = MarginHandler(4, delta=1.0, max_margin=2.5, output_dir=tmp_path, summary_writer=writer)
    batches = [_batch([0, 1], [False, True], [1.0, 0.5]), _batch([2, 3], [False, False], [1.0, 1.0])]
    engine = _engine(handler, batches)
    engine.run(batches, max_epochs=2)
    assert engine.has_event_handler(handler.epoch_completed, Events.EPOCH_COMPLETED)
    # epoch 1: [2, 0.75, 2, 2]; epoch 2: sample 1's estimate (0.75 + 0.5)/2; the others clamp at 2.5
    assert handler.margins.tolist() == [2.5, 0.625, 2.5, 2.5]
    with open(tmp_path / "margins.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "index", "margin"] and len(rows) == 1 + 2 * 4
    assert rows[1:5] == [["1", "0", "2"], ["1", "1", "0.75"], ["1", "2", "2"], ["1", "3", "2"]]
    assert engine.state.metrics["margin_max"] == 2.5 and engine.state.metrics["margin_refined"] == 0.25
    assert [(t, s) for t, _, s in writer.calls] == [("margin", 1), ("margin", 2)]
    assert torch.equal(writer.calls[-1][1], handler.margins)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["margins.csv"]  # no temporary file left


def test_diagnostics_per_epoch_split_by_foreground(tmp_path):
    handler = MarginHandler(4, delta=1.0, group_fn=label_has_foreground)
    labels = torch.zeros(4, 1, 2, 2)
    labels[:2, 0, 0, 0] = 1  # samples 0, 1 have foreground
    batch = _batch([0, 1, 2, 3], [False, True, True, True], [1.0, 1.0, 1.0, 1.0])
    batch.update(start_wrong=torch.tensor([False, False, True, True]), label=labels)
    engine = _engine(handler, [batch])
    engine.run([batch], max_epochs=1)
    m = engine.state.metrics
    assert m["margin_expanded"] == 0.25 and m["margin_refined"] == 0.75 and m["margin_start_wrong"] == 0.5
    assert m["margin_expanded_foreground"] == 0.5 and m["margin_refined_foreground"] == 0.5
    assert m["margin_start_wrong_foreground"] == 0.0 and m["margin_start_wrong_no_foreground"] == 1.0
    assert m["margin_expanded_no_foreground"] == 0.0 and m["margin_refined_no_foreground"] == 1.0
    assert m["margin_mean_foreground"] == 1.5 and m["margin_mean_no_foreground"] == 1.0
    # without a group function there is no split
    plain = MarginHandler(4, delta=1.0)
    engine = _engine(plain, [batch])
    engine.run([batch], max_epochs=1)
    assert "margin_expanded_foreground" not in engine.state.metrics
    assert engine.state.metrics["margin_start_wrong"] == 0.5


def test_csv_rewrites_epochs_of_a_resumed_run(tmp_path):
    handler = MarginHandler(2, delta=1.0, output_dir=tmp_path)
    path = tmp_path / "margins.csv"
    path.write_text("epoch,index,margin\n1,0,1\n1,1,1\n2,0,7\n2,1,7\n")  # epoch 2 written, then the run was killed
    handler.write_csv(path, 2)
    assert path.read_text() == "epoch,index,margin\n1,0,1\n1,1,1\n2,0,1\n2,1,1\n"


def test_missing_index_is_named():
    handler = MarginHandler(2, delta=1.0)
    batch = _batch([0, 1], [False, False], [1.0, 1.0])
    batch["index"] = None
    with pytest.raises(ValueError, match="'index'"):
        _engine(handler, [batch]).run([batch], max_epochs=1)


def test_output_transform_reads_another_engine_output_layout():
    handler = MarginHandler(2, delta=1.0, output_transform=lambda output: output["attack"])
    batch = _batch([0, 1], [False, True], [1.0, 0.5])
    _engine(handler, [{"attack": batch}]).run([{"attack": batch}], max_epochs=1)
    margins = handler.margins.tolist()
    assert margins[0] == 2.0 and margins[1] < 1.0  # 0 expands by delta, 1 (wrong at 0.5) is pulled back


def _rank(rank, world, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    handler = MarginHandler(6, delta=1.0)
    # rank 0 sees 0, 1, 2, 5; rank 1 sees 3, 4 and 2, 5 again (DistributedSampler pads with repeats)
    batches = (
        [_batch([0, 1, 2, 5], [False, True, True, True], [1.0, 0.5, 1.0, 1.0])]
        if rank == 0
        else [_batch([3, 4, 2, 5], [True, False, True, False], [0.25, 1.0, 0.5, 1.0])]
    )
    engine = _engine(handler, batches)
    engine.run(batches, max_epochs=1)
    torch.save(handler.margins, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_margins_identical_across_two_gloo_ranks(tmp_path):
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2, join=True)
    m0, m1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(m0, m1)
    # 0: expand; 1: (1 + 0.5)/2; 2: found on both ranks -> mean of the ranks' estimates, (1 + 0.75)/2;
    # 3: (1 + 0.25)/2; 4: expand; 5: found on rank 0 but survived on rank 1 -> expand (any appearance)
    assert m0.tolist() == [2.0, 0.75, 0.875, 0.625, 2.0, 2.0]


def test_attack_keys_are_plain_string_keys():
    from monai_amat.keys import AttackKeys

    assert AttackKeys.INDEX == "index" and {"index": 1}[AttackKeys.INDEX] == 1  # a StrEnum: plain string keys
