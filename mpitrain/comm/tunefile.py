"""The file `mpitrain tune` writes (comm/tune.py) and `auto` (comm/thresholds.py) and `hier`
(comm/hier.py) read: per layout (world size, node count), auto's thresholds for the all-reduce
and, optionally, for the reduce-scatter + all-gather pair of --zero ("sharded_thresholds"; a file
without them falls back to the built-in ones), and, on nodes of equal size, the buffer size from
which `hier` crosses nodes from every local rank.

    {"format": 1, "mpi": "...", "layouts": {"p4-n2": {"thresholds": [[1048576, "mpi"], [null, "hier"]],
                                                      "sharded_thresholds": [[null, "ring"]],
                                                      "hier_two_level_bytes": 1048576, ...}}}

It sits below the collectives (no import of them), so that each may read it.
"""

import json
import os

from mpitrain.errors import MpitrainError

ENV_FILE = "MPITRAIN_TUNE_FILE"
CANDIDATES = ("mpi", "rd", "hier", "ring")
# rd has no reduce-scatter of its own (it sums the whole bucket, comm/allreduce.py): never the pick.
SHARDED_CANDIDATES = ("mpi", "hier", "ring")
FORMAT = 1


def cache_path() -> str:
    """MPITRAIN_TUNE_FILE, else $XDG_CACHE_HOME/mpitrain/allreduce-tune.json (~/.cache by default)."""
    if os.environ.get(ENV_FILE):
        return os.environ[ENV_FILE]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mpitrain", "allreduce-tune.json")


def layout_key(world_size: int, nodes: int) -> str:
    return f"p{world_size}-n{nodes}"


def check_table(table, where: str, candidates=CANDIDATES) -> list:
    """A well-formed threshold list (increasing bounds, algorithms from `candidates`, last bound null)."""
    entries_ok = isinstance(table, list) and len(table) > 0 and all(
        isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) and entry[1] in candidates
        for entry in table
    )
    bounds = [entry[0] for entry in table[:-1]] if entries_ok else []
    bounds_ok = all(type(bound) is int and bound > 0 for bound in bounds) and bounds == sorted(bounds)
    if not entries_ok or table[-1][0] is not None or not bounds_ok:
        raise MpitrainError(f"{where}: thresholds must be [[bytes, algorithm], ..., [null, algorithm]] "
                            f"with increasing bytes and algorithms from {', '.join(candidates)}")
    return table


def read_file(path: str) -> dict:
    """The cache file's contents ({} when it does not exist), every layout's thresholds checked;
    MpitrainError when it is unreadable or not of this structure: {"format": 1, "layouts":
    {"p4-n1": {"thresholds": [...], "sharded_thresholds": [...] (optional), ...}, ...}, ...}."""
    try:
        with open(path) as handle:
            contents = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise MpitrainError(f"{path}: cannot read the all-reduce tuning file ({exc})") from None
    if not isinstance(contents, dict) or type(contents.get("format")) is not int or contents["format"] != FORMAT:
        raise MpitrainError(f"{path}: not an mpitrain tuning file of format {FORMAT}")
    layouts = contents.get("layouts", {})
    if not isinstance(layouts, dict):
        raise MpitrainError(f"{path}: not an mpitrain tuning file ('layouts' is a {type(layouts).__name__}, "
                            "not an object of layouts)")
    for key, entry in layouts.items():
        if not isinstance(entry, dict) or "thresholds" not in entry:
            raise MpitrainError(f"{path}: not an mpitrain tuning file (layout {key!r} is not an object "
                                "with 'thresholds')")
        check_table(entry["thresholds"], f"{path}: not an mpitrain tuning file: layout {key!r}")
        if "sharded_thresholds" in entry:
            check_table(entry["sharded_thresholds"], f"{path}: not an mpitrain tuning file: layout {key!r}, "
                        "sharded_thresholds", SHARDED_CANDIDATES)
        crossover = entry.get("hier_two_level_bytes")
        if crossover is not None and (type(crossover) is not int or crossover < 0):
            raise MpitrainError(f"{path}: not an mpitrain tuning file: layout {key!r} has hier_two_level_bytes "
                                f"{crossover!r} (expected bytes >= 0, or null for never)")
    return contents


def tuned_entry(world_size: int, nodes: int) -> dict | None:
    """This layout's entry of the tuning file (cache_path()), None when it has none; MpitrainError
    when the file cannot be read or is not one."""
    return read_file(cache_path()).get("layouts", {}).get(layout_key(world_size, nodes))
