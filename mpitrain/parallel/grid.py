"""The process grid: the world as data-parallel x pipeline x tensor-parallel groups.

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

Tensor-parallel ranks are adjacent (consecutive ranks share a node under block placement, and the
tensor group exchanges activations several times per layer); pipeline stages are farthest apart
(they exchange one activation per micro-batch). Each group is a `Comm.Split` of the world, so its
traffic can never match another group's.

`plan_layout` checks everything about a layout from the config and the world size alone, so a
layout that does not fit fails with the same one-line error on every rank before any message.
"""

from dataclasses import dataclass

from mpi4py import MPI

from mpitrain.data.sampler import local_batch_sizes
from mpitrain.errors import MpitrainError
from mpitrain.parallel.pipeline import MAX_MICRO_BATCHES, balance_stages, parse_stages


@dataclass(frozen=True)
class Layout:
    """The shape of a run: group sizes, the dense layers [start, stop) of each stage, micro-batching."""

    dp: int
    tp: int
    pp: int
    stages: tuple[tuple[int, int], ...]
    micro_batches: int
    schedule: str

    def describe(self) -> str:
        spans = " | ".join(f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in self.stages)
        return (f"dp {self.dp} x tp {self.tp} x pp {self.pp}; dense layers per stage [{spans}]; "
                f"{self.micro_batches} micro-batch(es), {self.schedule}")


def dense_param_counts(widths: list[int]) -> list[int]:
    """Parameters of each dense layer of the unsliced MLP: in*out + out."""
    return [n_in * n_out + n_out for n_in, n_out in zip(widths[:-1], widths[1:])]


def plan_layout(config, world_size: int, widths: list[int]) -> Layout:
    """The layout of `config` on `world_size` ranks, or MpitrainError naming what does not fit.

    Pure: every rank computes the same answer without communicating.
    """
    tp, pp, micro = config.tp, config.pp, config.micro_batches
    n_dense = len(widths) - 1
    if pp > n_dense:
        raise MpitrainError(f"--pp {pp}: --model {config.model} has only {n_dense} dense layer(s), "
                            "and every pipeline stage needs at least one")
    if config.stages is not None:
        counts = parse_stages(config.stages, pp, n_dense)
    else:
        counts = balance_stages(dense_param_counts(widths), pp)
    if world_size % (tp * pp):
        raise MpitrainError(f"world size {world_size} is not divisible by --tp {tp} x --pp {pp} = {tp * pp}: "
                            "data-parallel groups would be unequal")
    dp = world_size // (tp * pp)
    if micro > MAX_MICRO_BATCHES:
        raise MpitrainError(f"--micro-batches {micro}: at most {MAX_MICRO_BATCHES} (message tags encode the micro-batch)")
    if config.batch_size < dp:
        raise MpitrainError(f"--batch-size {config.batch_size} is smaller than the {dp} data-parallel groups")
    smallest = min(local_batch_sizes(config.batch_size, dp))
    if micro > smallest:
        raise MpitrainError(f"--micro-batches {micro} is more than the {smallest} samples each of the {dp} "
                            f"data-parallel group(s) gets of --batch-size {config.batch_size}")
    stops = [sum(counts[: i + 1]) for i in range(pp)]
    stages = tuple(zip([0] + stops[:-1], stops))
    return Layout(dp, tp, pp, stages, micro, config.pipeline_schedule)


@dataclass
class Grid:
    """This rank's place in the layout and the three communicators it talks on."""

    layout: Layout
    world: MPI.Intracomm
    tp_comm: MPI.Intracomm
    pp_comm: MPI.Intracomm
    dp_comm: MPI.Intracomm
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def free(self) -> None:
        for group in (self.tp_comm, self.pp_comm, self.dp_comm):
            group.Free()


def coordinates(rank: int, layout: Layout) -> tuple[int, int, int]:
    """(pp_rank, dp_rank, tp_rank) of a world rank: the inverse of rank = (pp*dp + d)*tp + t."""
    tp_rank = rank % layout.tp
    dp_rank = (rank // layout.tp) % layout.dp
    pp_rank = rank // (layout.tp * layout.dp)
    return pp_rank, dp_rank, tp_rank


def make_grid(comm: MPI.Intracomm, layout: Layout) -> Grid:
    """Split comm into this rank's tensor, pipeline and data-parallel groups. Collective on comm.

    Each group's ranks are ordered by world rank, so a group rank is the coordinate along it.
    """
    if comm.size != layout.dp * layout.tp * layout.pp:
        raise MpitrainError(f"layout {layout.describe()} needs {layout.dp * layout.tp * layout.pp} ranks, "
                            f"not {comm.size}")
    pp_rank, dp_rank, tp_rank = coordinates(comm.rank, layout)
    tp_comm = comm.Split(color=pp_rank * layout.dp + dp_rank, key=comm.rank)
    pp_comm = comm.Split(color=dp_rank * layout.tp + tp_rank, key=comm.rank)
    dp_comm = comm.Split(color=pp_rank * layout.tp + tp_rank, key=comm.rank)
    return Grid(layout, comm, tp_comm, pp_comm, dp_comm, tp_rank, pp_rank, dp_rank)
