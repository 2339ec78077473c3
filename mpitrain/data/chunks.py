"""HDF5 chunk caches sized to what a rank reads, and the warning when no cache can be big enough.

A chunked dataset is read a whole chunk at a time (and, compressed, decompressed a whole chunk at a
time). h5py's default cache is 1 MiB per dataset: a (1000, 784) float32 chunk is 3 MiB, so it is
never cached and every scattered row read decompresses its whole chunk again. Two cases:

- reads that visit each row once (--sampler shard: one read of a rank's block, one of its validation
  rows): each read call decompresses a chunk once; a cache of two chunks keeps the chunk shared by
  two neighbouring runs, so it is not decompressed twice.
- reads that come back to the same chunks (--sampler global: every step reads scattered rows): the
  cache holds every chunk of the dataset, up to a budget per rank (MPITRAIN_CHUNK_CACHE_MB, default
  512), so each chunk is decompressed once per run instead of once per row.
"""

import math
import os

import h5py
import numpy as np

from mpitrain.errors import MpitrainError

DEFAULT_BUDGET_MB = 512
H5_DEFAULT_CACHE = 1 << 20
# HDF5's advice: about 100 hash slots per chunk that fits, a prime number of them to spread chunks.
SLOTS_PER_CHUNK = 100
MAX_SLOTS = 1 << 24


def budget_bytes() -> int:
    """Chunk-cache bytes a rank may spend over all datasets it reads again and again."""
    value = os.environ.get("MPITRAIN_CHUNK_CACHE_MB", str(DEFAULT_BUDGET_MB))
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:
        raise MpitrainError(f"MPITRAIN_CHUNK_CACHE_MB={value!r}: expected a number of MiB >= 0")
    return int(megabytes * (1 << 20))


def chunk_bytes(dataset: h5py.Dataset) -> int:
    """Uncompressed bytes of one chunk (0 for a contiguous dataset)."""
    if dataset.chunks is None:
        return 0
    return int(np.prod(dataset.chunks)) * dataset.dtype.itemsize


def all_chunks_bytes(dataset: h5py.Dataset) -> int:
    """Uncompressed bytes of every chunk of the dataset (edge chunks count whole)."""
    if dataset.chunks is None:
        return 0
    count = math.prod(-(-n // c) for n, c in zip(dataset.shape, dataset.chunks))
    return count * chunk_bytes(dataset)


def _prime_at_least(n: int) -> int:
    n = max(n, 2)
    while any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)):
        n += 1
    return n


def cache_sizes(datasets: list[h5py.Dataset], rereads: bool) -> tuple[list[int], int, int]:
    """(cache bytes per dataset, bytes wanted, budget): all chunks when rows are read again (within
    the budget, shared in proportion), else two chunks; never below h5py's default."""
    if not rereads:
        return [max(H5_DEFAULT_CACHE, 2 * chunk_bytes(d)) for d in datasets], 0, 0
    wanted = [all_chunks_bytes(d) for d in datasets]
    total, budget = sum(wanted), budget_bytes()
    share = 1.0 if total <= budget else budget / total
    return [max(H5_DEFAULT_CACHE, int(w * share)) for w in wanted], total, budget


def open_with_cache(handle: h5py.File, name: str, nbytes: int) -> h5py.Dataset:
    """Dataset `name` of an open file, reopened with a chunk cache of `nbytes`."""
    dataset = handle[name]
    per_chunk = chunk_bytes(dataset)
    if per_chunk == 0 or nbytes <= H5_DEFAULT_CACHE:
        return dataset
    slots = min(MAX_SLOTS, _prime_at_least(SLOTS_PER_CHUNK * max(1, nbytes // per_chunk)))
    access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    access.set_chunk_cache(slots, nbytes, 0.75)
    return h5py.Dataset(h5py.h5d.open(handle.id, dataset.name.encode(), dapl=access))


def describe_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def reread_warning(x: h5py.Dataset, path: str, wanted: int, budget: int, local_batch: int) -> str | None:
    """One line when --sampler global will decompress the same chunks again and again, and what to do."""
    if x.chunks is None or wanted <= budget:
        return None
    rows = x.chunks[0]
    if rows <= max(1, local_batch // 4):
        return None
    codec = f"{x.compression}-compressed " if x.compression else ""
    return (f"mpitrain: warning: --sampler global reads scattered rows of {path}: its {codec}chunks of {rows} rows "
            f"({describe_bytes(chunk_bytes(x))}) need a {describe_bytes(wanted)} chunk cache but a rank may use "
            f"{describe_bytes(budget)}, so chunks are decompressed again for most rows read; use --sampler shard, "
            f"raise MPITRAIN_CHUNK_CACHE_MB, or rewrite the data with row-sized chunks "
            f"(mpitrain data import --chunk-rows {max(1, min(64, local_batch))})")
