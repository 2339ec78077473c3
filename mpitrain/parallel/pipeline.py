"""The layer pipeline: stages, micro-batch schedules, and the point-to-point links between stages.

The dense layers are cut into P contiguous stages. Each step, a rank's share of the global batch
is cut into M micro-batches, and every stage runs a schedule, a list of ("F", m) and ("B", m):

    gpipe  all M forwards, then all M backwards: simple, but holds M micro-batches of activations.
    1f1b   P-1-s forwards to fill the pipe, then one forward and one backward in turn, then the
           last backwards: the same bubble, but at most P-s micro-batches in flight on stage s.

Both leave each stage idle for (P-1) of (M+P-1) slots: the bubble fraction (P-1)/(M+P-1).

Messages: stage s sends its output for micro-batch m to stage s+1, which sends dL/d(input) back.
The tag is 2m + direction, so no two messages of one step between two stages share a tag and a
receive can never take another micro-batch's data. Sends are non-blocking and completed at the
end of the step; receives block. Because every stage runs its actions in an order that respects
the data dependencies, a blocking receive always has a matching send that its sender will reach,
and no two neighbours can wait on each other's sends (which plain blocking Send could do in 1F1B).
"""

import time

import numpy as np
from mpi4py import MPI

from mpitrain.backend import for_mpi, receive_buffer
from mpitrain.comm.fingerprint import CHECK
from mpitrain.comm.ring import chunk_bounds
from mpitrain.comm.watchdog import waiting
from mpitrain.errors import MpitrainError
from mpitrain.trace import TRACE

SCHEDULES = ("1f1b", "gpipe")
_ACTIVATION, _GRADIENT = 0, 1
_KIND = ("activation", "gradient")
# MPI promises tags up to 32767 on every implementation; two tags per micro-batch.
MAX_MICRO_BATCHES = 32767 // 2


def message_tag(direction: int, micro: int) -> int:
    """Tag of micro-batch `micro`'s activation (direction 0) or gradient (1): unique per step."""
    return 2 * micro + direction


# ---------------------------------------------------------------------------- stages


def balance_stages(param_counts: list[int], stages: int) -> list[int]:
    """Dense layers per stage: the contiguous split into `stages` non-empty groups whose largest
    parameter count is smallest (exact, by dynamic programming over split points)."""
    n = len(param_counts)
    prefix = np.concatenate([[0], np.cumsum(param_counts)]).tolist()
    # best[k][i]: smallest possible max load putting the first i layers on k stages; cut[k][i] the last cut.
    infinity = float("inf")
    best = [[infinity] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                load = max(best[k - 1][j], prefix[i] - prefix[j])
                if load < best[k][i]:
                    best[k][i], cut[k][i] = load, j
    counts, i = [], n
    for k in range(stages, 0, -1):
        counts.append(i - cut[k][i])
        i = cut[k][i]
    return counts[::-1]


def parse_stages(spec: str, stages: int, n_dense: int) -> list[int]:
    """--stages '2,1' -> [2, 1]: dense layers per stage, one positive count per stage, summing to all."""
    parts = spec.split(",")
    if not all(part.strip().isdecimal() and int(part) > 0 for part in parts):
        raise MpitrainError(f"--stages '{spec}': expected positive layer counts joined by ',', like 2,1")
    counts = [int(part) for part in parts]
    if len(counts) != stages or sum(counts) != n_dense:
        raise MpitrainError(f"--stages '{spec}': expected {stages} counts (--pp {stages}) summing to the "
                            f"model's {n_dense} dense layers")
    return counts


# ---------------------------------------------------------------------------- schedules


def schedule(kind: str, stages: int, stage: int, micro_batches: int) -> list[tuple[str, int]]:
    """The actions ("F", m) / ("B", m) of `stage` (0-based) for one step, in order."""
    m = micro_batches
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if kind != "1f1b":
        raise MpitrainError(f"pipeline schedule '{kind}': expected one of {', '.join(SCHEDULES)}")
    warmup = min(stages - 1 - stage, m)
    actions = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [("F", warmup + i), ("B", i)]
    return actions + [("B", i) for i in range(m - warmup, m)]


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Share of a step each stage sits idle in either schedule: (P-1)/(M+P-1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def micro_batch_bounds(local_batch: int, micro_batches: int) -> list[tuple[int, int]]:
    """[start, stop) rows of each micro-batch of a local batch: sizes differ by at most one."""
    return chunk_bounds(local_batch, micro_batches)


# ---------------------------------------------------------------------------- links between stages


class StageLink:
    """This rank's messages to the same tensor/data coordinates on the previous and next stage.

    Call every method in schedule order; `finish()` completes this step's sends. Counts the bytes
    sent and the seconds spent waiting for a neighbour (the bubble, plus any imbalance).
    """

    def __init__(self, pp_comm: MPI.Intracomm, xp):
        self.comm, self.xp = pp_comm, xp
        self.stage, self.stages = pp_comm.rank, pp_comm.size
        self.pending: list[tuple[MPI.Request, np.ndarray]] = []
        self.bytes_sent = 0
        self.wait_s = 0.0

    def _send(self, array, dest: int, tag: int) -> None:
        # The buffer (a host copy, or the device array with a CUDA-aware MPI) must outlive the
        # non-blocking send, so it is kept with its request.
        host = for_mpi(self.xp.ascontiguousarray(array))
        if CHECK.active:
            CHECK.send(self.comm, host, dest, tag, depth=2)
        if TRACE.active:
            started = TRACE.now()
        self.pending.append((self.comm.Isend(host, dest, tag), host))
        self.bytes_sent += host.nbytes
        if TRACE.active:
            TRACE.message(True, "pipeline", "pp", self.comm, dest, tag, f"send {_KIND[tag % 2]} m{tag // 2} to stage "
                          f"{dest}", started, host.nbytes, micro=tag // 2)

    def _recv(self, shape, dtype, source: int, tag: int):
        host = receive_buffer(self.xp, shape, dtype)
        started = time.perf_counter()
        if CHECK.active:
            CHECK.recv(self.comm, host, source, tag, depth=2)
        self.comm.Recv(host, source, tag)
        self.wait_s += time.perf_counter() - started
        if TRACE.active:
            TRACE.message(False, "pipeline", "pp", self.comm, source, tag, f"recv {_KIND[tag % 2]} m{tag // 2} from "
                          f"stage {source}", started, host.nbytes, micro=tag // 2)
        return self.xp.asarray(host)

    def send_activation(self, y, micro: int) -> None:
        self._send(y, self.stage + 1, message_tag(_ACTIVATION, micro))

    def recv_activation(self, shape, dtype, micro: int):
        return self._recv(shape, dtype, self.stage - 1, message_tag(_ACTIVATION, micro))

    def send_gradient(self, dx, micro: int) -> None:
        self._send(dx, self.stage - 1, message_tag(_GRADIENT, micro))

    def recv_gradient(self, shape, dtype, micro: int):
        return self._recv(shape, dtype, self.stage + 1, message_tag(_GRADIENT, micro))

    def finish(self) -> None:
        """Complete this step's sends and release their buffers."""
        with waiting(f"Waitall ({len(self.pending)} pipeline send(s) to the neighbouring stages)"):
            MPI.Request.Waitall([request for request, _ in self.pending])
        self.pending.clear()
