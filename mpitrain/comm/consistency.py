"""Start-up check that every rank is about to run the same job.

Ranks launched with different config files or flags (an MPMD line, a per-node TOML, a stale
environment) would otherwise train different models side by side, or hang in a collective one
of them never calls. Each rank hashes its fields; the ranks compare one digest each, and only
on a mismatch exchange the values, to say which ranks differ in which fields.
"""

import hashlib
import json

from mpi4py import MPI

from mpitrain.errors import MpitrainError

MAX_FIELDS_SHOWN = 4


def digest(fields: dict) -> str:
    """SHA-256 of the fields as canonical JSON (keys sorted)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def describe_mismatch(per_rank: list[dict]) -> str:
    """'ranks differ in lr (0.001 on rank 0; 0.01 on rank 1), ...' from every rank's fields."""
    names = sorted({name for fields in per_rank for name in fields})
    differing = []
    for name in names:
        by_value: dict[str, list[int]] = {}
        for rank, fields in enumerate(per_rank):
            by_value.setdefault(json.dumps(fields.get(name), sort_keys=True, default=str), []).append(rank)
        if len(by_value) > 1:
            shown = "; ".join(f"{_shorten(value)} on {_ranks(ranks)}" for value, ranks in by_value.items())
            differing.append(f"{name} ({shown})")
    more = len(differing) - MAX_FIELDS_SHOWN
    text = ", ".join(differing[:MAX_FIELDS_SHOWN]) + (f", and {more} more field(s)" if more > 0 else "")
    return f"ranks differ in {text}"


def _shorten(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    listed = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
    return f"ranks {listed}"


def check_consistent(comm: MPI.Intracomm, fields: dict, what: str) -> None:
    """Raise the same MpitrainError on every rank if any rank's JSON-able `fields` differ. Collective."""
    digests = comm.allgather(digest(fields))
    if len(set(digests)) == 1:
        return
    raise MpitrainError(f"inconsistent {what}: {describe_mismatch(comm.allgather(fields))}")
