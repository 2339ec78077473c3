"""MPICH's shared-memory segments in /dev/shm: this job's, and the stale ones of dead jobs.

    release_own_segments(MPI.COMM_WORLD)     # collective, once after MPI_Init (comm/world.py does it)
    mpitrain doctor --clean-shm              # remove segments of dead jobs (owned by you, no live process attached)

MPICH (ch4) maps mpich_shm_<hash>_<node> (and mpich_vci_...) on every rank of a node in MPI_Init
and unlinks them in MPI_Finalize, so a rank killed hard, an MPI_Abort (--comm-timeout, an uncaught
exception) or a killed mpirun leaves 2-4 MB behind per node. Once every rank of the node has
mapped a segment its name is no longer needed (the mappings live on, as for any unlinked file),
so mpitrain removes the names right after start-up: whatever way the job ends, nothing of it
stays in /dev/shm. Segments made later, or by other MPI programs, are what `doctor` is for.
Under Slurm, python -m mpitrain.slurm also clears the segments a requeued step would collide with.
"""

import os
import stat
import time

from mpi4py import MPI

SHM_DIR = "/dev/shm"
PREFIXES = ("mpich_shm_", "mpich_vci_")


def mapped_segments(maps: str = "/proc/self/maps") -> list[str]:
    """The MPICH segments this process has mapped whose names still exist."""
    try:
        with open(maps) as handle:
            paths = _map_paths(handle)
    except OSError:
        return []
    return sorted(p for p in paths if os.path.dirname(p) == SHM_DIR and os.path.basename(p).startswith(PREFIXES))


def _map_paths(lines) -> set[str]:
    """The file names in /proc/PID/maps lines (address, perms, offset, device, inode, name)."""
    return {parts[5].strip() for parts in (line.split(None, 5) for line in lines) if len(parts) == 6}


def release_own_segments(comm: MPI.Intracomm) -> list[str]:
    """Unlink the names of the segments the ranks of this node have all mapped. Collective on comm."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    try:
        # Every rank of the node has left MPI_Init, so every rank has mapped the init segments.
        node.Barrier()
        removed = []
        if node.rank == 0:
            for path in mapped_segments():
                try:
                    os.unlink(path)
                    removed.append(path)
                except OSError:
                    pass
        node.Barrier()
        return removed
    finally:
        node.Free()


# ---------------------------------------------------------------------------- mpitrain doctor --clean-shm


def attached_paths(proc: str = "/proc") -> set[str]:
    """Every file some live process maps or holds open (those of other users' processes that this
    user may not read are missing: they cannot attach this user's 0600 segments anyway)."""
    attached: set[str] = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            with open(os.path.join(proc, pid, "maps")) as handle:
                attached.update(_map_paths(handle))
            fds = os.path.join(proc, pid, "fd")
            for fd in os.listdir(fds):
                try:
                    attached.add(os.readlink(os.path.join(fds, fd)))
                except OSError:
                    pass
        except OSError:
            continue
    return attached


def stale_segments(shm_dir: str = SHM_DIR, min_age_s: float = 60.0) -> tuple[list[str], list[str]]:
    """(stale, kept): MPICH segments in shm_dir that are regular files of this user, older than
    min_age_s (a job in MPI_Init may not have mapped its new segment yet) and that no live process
    maps or holds open; and the other MPICH-named entries, left alone."""
    attached = attached_paths()
    stale, kept = [], []
    now = time.time()
    for name in sorted(os.listdir(shm_dir)):
        if not name.startswith(PREFIXES):
            continue
        path = os.path.join(shm_dir, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        ours = stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
        (stale if ours and now - info.st_mtime >= min_age_s and path not in attached else kept).append(path)
    return stale, kept


def clean_stale(shm_dir: str = SHM_DIR, min_age_s: float = 60.0) -> tuple[list[str], list[str]]:
    """Remove the stale segments of stale_segments; returns (removed, kept)."""
    stale, kept = stale_segments(shm_dir, min_age_s)
    removed = []
    for path in stale:
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed, kept
