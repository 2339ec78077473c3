"""The process grid: group membership, tensor ranks adjacent, and layouts that do not fit refused alike."""

import itertools

import pytest

from groups import groups_of
from harness import mpitrain_argv, run_on_root
from mpitrain.errors import MpitrainError
from mpitrain.parallel.grid import coordinates, make_grid, plan_layout
from mpitrain.train import train
from parallel_runs import config

LAYOUTS = [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4), (2, 1, 1), (1, 2, 1), (1, 1, 2)]


@pytest.mark.parametrize("dp,tp,pp", LAYOUTS)
def test_groups_partition_the_world_with_tensor_ranks_adjacent(comm, dp, tp, pp):
    layout = plan_layout(config(tp=tp, pp=pp, micro_batches=1), dp * tp * pp, [12, 10, 9, 7, 3])
    assert (layout.dp, layout.tp, layout.pp) == (dp, tp, pp)
    with groups_of(comm, dp * tp * pp) as world:
        if world is None:
            return
        grid = make_grid(world, layout)
        members = {name: group.allgather(world.rank) for name, group in
                   (("tp", grid.tp_comm), ("pp", grid.pp_comm), ("dp", grid.dp_comm))}
        coords = (grid.pp_rank, grid.dp_rank, grid.tp_rank)
        rank = world.rank
        grid.free()
    assert coords == coordinates(rank, layout)
    assert members["tp"] == list(range(rank - grid.tp_rank, rank - grid.tp_rank + tp))
    assert len(members["pp"]) == pp and len(members["dp"]) == dp
    # A rank's pipeline (data-parallel) peers share its other two coordinates.
    for name, axis in (("pp", 0), ("dp", 1)):
        others = [coordinates(peer, layout) for peer in members[name]]
        assert [c[axis] for c in others] == list(range(len(others)))
        assert all(c[:axis] + c[axis + 1:] == coords[:axis] + coords[axis + 1:] for c in others)


def test_coordinates_are_a_bijection():
    layout = plan_layout(config(tp=2, pp=3, micro_batches=1), 12, [12, 10, 9, 7, 3])
    seen = {coordinates(rank, layout) for rank in range(12)}
    assert seen == set(itertools.product(range(3), range(2), range(2)))


@pytest.mark.parametrize("overrides,message", [
    (dict(tp=3), r"world size \d+ is not divisible by --tp 3 x --pp 1 = 3"),
    (dict(pp=5), "--pp 5: --model 12-10-9-7-3 has only 4 dense layer"),
    (dict(pp=2, stages="3,2"), "--stages '3,2': expected 2 counts"),
    (dict(micro_batches=13), r"--micro-batches 13 is more than the \d+ samples"),
])
def test_a_layout_that_does_not_fit_fails_on_every_rank(comm, small_classification, overrides, message):
    """Raised before any message, the same on every rank, so no rank waits for another. The world
    size 3 never divides 1, 2 or 4 ranks."""
    with pytest.raises(MpitrainError, match=message):
        train(config(data=small_classification, **overrides), comm)
    comm.Barrier()


def test_cli_reports_a_bad_layout_once_and_exits_2(comm):
    result = run_on_root(comm, mpitrain_argv(2, "train", "--no-progress", "--device", "cpu", "--model", "8-4-3",
                                             "--tp", "3"), timeout=60)
    assert result["returncode"] == 2, result
    lines = result["stderr"].strip().splitlines()
    assert lines == ["mpitrain: error: world size 2 is not divisible by --tp 3 x --pp 1 = 3: "
                     "data-parallel groups would be unequal"], result["stderr"]


def test_flags_and_toml_keys_fill_the_model_parallel_config(tmp_path):
    from mpitrain.cli import make_parser, train_config

    path = tmp_path / "run.toml"
    path.write_text('tp = 2\nmicro-batches = 4\npipeline-schedule = "gpipe"\n')
    settings = train_config(make_parser().parse_args(
        ["train", "--config", str(path), "--pp", "2", "--stages", "3,1", "--init-from", "start.h5"]))
    assert (settings.tp, settings.pp, settings.stages, settings.micro_batches) == (2, 2, "3,1", 4)
    assert (settings.pipeline_schedule, settings.init_from) == ("gpipe", "start.h5")


@pytest.mark.parametrize("flags,message", [(["--tp", "0"], "--tp 0: must be at least 1"),
                                           (["--micro-batches", "0"], "--micro-batches 0: must be at least 1"),
                                           (["--pipeline-schedule", "zb"], "--pipeline-schedule 'zb': expected one of 1f1b, gpipe")])
def test_bad_model_parallel_flags_are_refused(flags, message):
    from mpitrain.cli import make_parser, train_config

    with pytest.raises(MpitrainError, match=message):
        train_config(make_parser().parse_args(["train", *flags]))
