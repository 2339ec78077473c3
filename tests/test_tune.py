"""`auto`: thresholds fitted from timings, read from the tuning file by rank 0 for every rank."""

import json
import os

import numpy as np
import pytest

from mpitrain.comm import allreduce, hier, tune
from mpitrain.errors import MpitrainError


def test_fit_keeps_the_fastest_per_size_and_merges_runs():
    sizes = [8, 64, 512, 4096, 32768]
    seconds = {"mpi": [1, 1, 5, 9, 9], "ring": [9, 9, 1, 1, 9], "rd": [9, 9, 9, 9, 1]}
    assert tune.fit(sizes, seconds) == [[512, "mpi"], [32768, "ring"], [None, "rd"]]


def test_fit_ignores_a_lone_winner_by_a_small_margin():
    sizes = [8, 64, 512]
    assert tune.fit(sizes, {"mpi": [1, 1.05, 1], "rd": [2, 1.0, 2]}) == [[None, "mpi"]]
    assert tune.fit(sizes, {"mpi": [1, 2.0, 1], "rd": [2, 1.0, 2]}) == [[64, "mpi"], [512, "rd"], [None, "mpi"]]


def test_thresholds_pick_the_band_a_size_falls_in():
    choose = tune.Thresholds([[100, "mpi"], [1000, "rd"], [None, "ring"]])
    assert [choose(n) for n in (0, 99, 100, 999, 1000, 1 << 30)] == ["mpi", "mpi", "rd", "rd", "ring", "ring"]


@pytest.mark.parametrize("world,nodes", [(2, 1), (3, 1), (4, 1), (64, 1), (8, 2)])
def test_defaults_exist_for_every_layout(world, nodes):
    table = tune.check_table(tune.default_table(world, nodes), "defaults")
    assert table[-1][0] is None
    sharded = tune.check_table(tune.default_table(world, nodes, sharded=True), "defaults", tune.SHARDED_CANDIDATES)
    assert sharded[-1][0] is None


def _key(comm) -> str:
    """This job's layout key, nodes included (MPITRAIN_RANKS_PER_NODE may emulate several)."""
    return tune.layout_key(comm.size, hier.node_group(comm).nodes)


def _write(path, layouts):
    with open(path, "w") as out:
        json.dump({"format": tune.FORMAT, "layouts": layouts}, out)


def test_auto_follows_rank_0s_tuning_file(comm, tmp_path, monkeypatch):
    """Each rank writes its own file; rank 0's wins on every rank, so the ranks never disagree."""
    path = os.path.join(tmp_path, "tune.json")
    key = _key(comm)
    _write(path, {key: {"thresholds": [[64, "rd" if comm.rank == 0 else "mpi"], [None, "ring"]]}})
    monkeypatch.setenv(tune.ENV_FILE, path)
    fresh = comm.Dup()
    chosen = [tune.choose(n, fresh) for n in (8, 64, 1 << 20)] if comm.size > 1 else None
    buf = np.ones(3)
    allreduce(buf, fresh, "auto")
    fresh.Free()
    if comm.size > 1:
        assert chosen == ["rd", "ring", "ring"]
    np.testing.assert_array_equal(buf, np.full(3, comm.size))


def test_zero_halves_follow_their_own_thresholds_and_default_without_them(comm, tmp_path, monkeypatch):
    """A layout's sharded_thresholds pick the reduce-scatter + all-gather of --zero, and its
    thresholds the all-reduce; an entry without sharded ones (a file from before they existed)
    leaves the halves on the built-in table. The pick is the algorithm that actually runs: the
    halves of hier on one node send no message, the ring's send each rank's chunk."""
    from mpitrain.comm import traffic
    from mpitrain.comm.allreduce import resolve, shard_gather_schedule, shard_reduce_schedule
    from mpitrain.comm.ring import chunk_bounds, complete

    path = os.path.join(tmp_path, "tune.json")
    key = _key(comm)
    _write(path, {key: {"thresholds": [[None, "hier"]], "sharded_thresholds": [[None, "ring"]]}})
    monkeypatch.setenv(tune.ENV_FILE, path)
    fresh = comm.Dup()
    picks = [resolve("auto", 1 << 20, fresh), resolve("auto", 1 << 20, fresh, sharded=True)]
    buf = np.arange(1000, dtype=np.float64) * (comm.rank + 1)
    chunks = chunk_bounds(buf.size, comm.size)
    before = traffic.sent()
    complete(shard_reduce_schedule(buf, fresh, "auto", chunks))
    complete(shard_gather_schedule(buf, fresh, "auto", chunks))
    sent = traffic.sent() - before
    fresh.Free()
    np.testing.assert_array_equal(buf, np.arange(1000) * comm.size * (comm.size + 1) / 2)
    if comm.size > 1:
        assert picks == ["hier", "ring"]
        assert sent == 2 * (buf.size - buf.size // comm.size) * buf.itemsize
    _write(path, {key: {"thresholds": [[None, "mpi"]]}})
    fresh = comm.Dup()
    picks = [resolve("auto", n, fresh, sharded=True) for n in (8, 1 << 20, 1 << 30)] if comm.size > 1 else None
    fresh.Free()
    if comm.size > 1:
        expected = tune.Thresholds(tune.default_table(comm.size, hier.node_group(comm).nodes, sharded=True))
        assert picks == [expected(8), expected(1 << 20), expected(1 << 30)]


def test_a_sharded_table_with_rd_is_refused():
    """rd has no reduce-scatter of its own (it sums the whole bucket): never a sharded pick."""
    with pytest.raises(MpitrainError, match="algorithms from mpi, hier, ring"):
        tune.check_table([[None, "rd"]], "sharded", tune.SHARDED_CANDIDATES)


def test_a_malformed_sharded_table_fails_on_every_rank(comm, tmp_path, monkeypatch):
    path = os.path.join(tmp_path, "tune.json")
    _write(path, {_key(comm): {"thresholds": [[None, "mpi"]], "sharded_thresholds": [[None, "rd"]]}})
    monkeypatch.setenv(tune.ENV_FILE, path)
    fresh = comm.Dup()
    with pytest.raises(MpitrainError, match="sharded_thresholds: thresholds must be"):
        tune.choose(8, fresh, sharded=True)
    fresh.Free()


def test_a_malformed_file_fails_on_every_rank(comm, tmp_path, monkeypatch):
    path = os.path.join(tmp_path, "tune.json")
    _write(path, {_key(comm): {"thresholds": [[64, "bogus"]]}})
    monkeypatch.setenv(tune.ENV_FILE, path)
    fresh = comm.Dup()
    with pytest.raises(MpitrainError, match="thresholds must be"):
        tune.choose(8, fresh)
    fresh.Free()


def test_tune_measures_and_saves_this_layout(comm, tmp_path):
    path = comm.bcast(os.path.join(tmp_path, "tune.json"), root=0)
    key, table, sharded = tune.tune(comm, max_bytes=1024, trials=1, path=path)
    saved = tune.read_file(path) if comm.rank == 0 else None
    assert key == _key(comm)
    tune.check_table(table, "fitted")
    tune.check_table(sharded, "fitted", tune.SHARDED_CANDIDATES)
    if comm.rank == 0:
        assert saved["layouts"][key]["thresholds"] == table
        assert saved["layouts"][key]["sharded_thresholds"] == sharded
        assert saved["layouts"][key]["measured"]["bytes"] == [8 << e for e in range(8)]  # 8 B .. 1 KiB
        timings = saved["layouts"][key]["measured"]["sharded_seconds"]
        assert sorted(timings) == sorted(tune.SHARDED_CANDIDATES)
        assert all(len(seconds) == 8 and min(seconds) > 0 for seconds in timings.values())


def test_the_tune_command_writes_the_file_or_asks_for_ranks(comm, tmp_path, capsys):
    from mpitrain import cli

    path = comm.bcast(os.path.join(tmp_path, "cli.json"), root=0)
    argv = ["tune", "--max-mb", "0.001", "--trials", "1", "--out", path]
    if comm.size == 1:
        with pytest.raises(MpitrainError, match="mpirun -n N"):
            cli.run(argv)
        return
    cli.run(argv)
    key = _key(comm)
    written = tune.read_file(path) if comm.rank == 0 else None
    if comm.rank == 0:
        assert key in written["layouts"]
        assert f"wrote {path}" in capsys.readouterr().out


def test_fit_crossover_is_where_the_two_level_scheme_wins_from_on():
    sizes = [1, 2, 4, 8]
    assert tune.fit_crossover(sizes, [3, 2, 1, 1], [2, 2, 2, 2]) == 2
    assert tune.fit_crossover(sizes, [1, 3, 1, 1], [2, 2, 2, 2]) == 4  # a loss at 2 B: from the next size on
    assert tune.fit_crossover(sizes, [1, 1, 1, 3], [2, 2, 2, 2]) is None
    assert tune.fit_crossover(sizes, [1, 1, 1, 1], [2, 2, 2, 2]) == 1


def test_tune_on_nodes_of_equal_size_learns_where_hier_crosses_from_every_rank(comm, tmp_path, monkeypatch):
    """Emulated nodes of 2 ranks: tune times both hier variants and saves the crossover with the
    thresholds; a new communicator's hier reads it from the file (rank 0's, for all), and a value
    that is not bytes fails on every rank alike."""
    if comm.size < 4 or comm.size % 2:
        pytest.skip("needs at least two emulated nodes of two ranks")
    monkeypatch.setenv("MPITRAIN_RANKS_PER_NODE", "2")
    path = comm.bcast(os.path.join(tmp_path, "tune.json"), root=0)
    monkeypatch.setenv(tune.ENV_FILE, path)
    fresh = comm.Dup()
    key, _, _ = tune.tune(fresh, max_bytes=64 << 10, trials=1, path=path)
    fresh.Free()
    assert key == tune.layout_key(comm.size, comm.size // 2)
    entry = comm.bcast(tune.read_file(path)["layouts"][key] if comm.rank == 0 else None, root=0)
    assert entry["measured"]["hier"]["bytes"] == [16 << 10, 32 << 10, 64 << 10]
    crossover = entry["hier_two_level_bytes"]
    assert crossover is None or crossover in entry["measured"]["hier"]["bytes"]
    fresh = comm.Dup()
    assert hier.node_group(fresh).two_level_bytes == crossover
    fresh.Free()
    if comm.rank == 0:
        contents = tune.read_file(path)
        contents["layouts"][key]["hier_two_level_bytes"] = "1 MiB"
        with open(path, "w") as out:
            json.dump(contents, out)
    comm.Barrier()
    fresh = comm.Dup()
    with pytest.raises(MpitrainError, match="hier_two_level_bytes '1 MiB'"):
        hier.node_group(fresh)
    fresh.Free()
