"""The machine profile: what the cost model knows about a machine, as one JSON file.

    profile = load("cluster.json")          # a calibrated or hand-written profile
    profile = builtin()                     # the 2-core development machine of the README's table
    save(profile, "machine.json")

Fields (every rate is per core: one rank with one BLAS thread; times in seconds, sizes in bytes):

    format                     1
    name, source               free text: where the numbers come from (calibration date, a data sheet)
    cores_per_node             cores a node's ranks share (BLAS threads per rank = cores // ranks)
    gemm_flops_per_s           {dtype: FLOP/s}: the rate used for a GEMM shape not in `gemm`
    gemm                       [{dtype, m, k, n, flops_per_s, threads}]: measured (m, k) x (k, n)
                               products with `threads` BLAS threads (default 1: per core); a GEMM
                               takes the rate of the nearest measured shape (log distance) of the
                               rank's thread count, else of one thread times its threads
    memory_bandwidth_per_core  bytes/s one rank streams alone (element-wise work, the optimizer)
    memory_bandwidth_per_node  bytes/s all ranks of a node stream together (the share each gets)
    stream                     [{bytes, bytes_per_s}]: measured bandwidth per core, every core busy,
                               by working set (caches make small buffers faster); when present,
                               element-wise work takes the entry nearest its working set
    stream_alone_factor        how much faster a rank alone on its node streams than the `stream`
                               table says (1: no faster; --calibrate measures it in a step); without
                               a table the per-core bandwidth is already a rank alone's
    op_overhead_s              cost of one array call regardless of its size (Python and dispatch)
    message_overhead_s         cost in Python of one message of a hand-written collective
    step_overhead_s            fixed cost of one training step (batch, checks, loop)
    overlap_efficiency         share of a gradient bucket's all-reduce that the backward still to run
                               hides (0: none, 1: all), as --calibrate measures it (training
                               with --overlap and without); 0 where one core runs both
    links                      {"intra": {alpha_s, beta_s_per_byte}, "inter": {...}}: point-to-point
                               time alpha + n beta within a node and across nodes
    collectives                [{algorithm, ranks, nodes, bytes: [...], seconds: [...], kind}]:
                               measured curves, of the all-reduce (kind "allreduce", the default)
                               or of --zero's reduce-scatter + all-gather pair (kind "halves");
                               used (interpolated) for a group of that many ranks and nodes, the
                               alpha-beta formulas elsewhere

A hand-written profile needs only format, cores_per_node, gemm_flops_per_s,
memory_bandwidth_per_core, memory_bandwidth_per_node and links.intra; the rest default as in
`builtin()` (links.inter to links.intra, no curves, no measured shapes).
"""

import json
import math
import os

from mpitrain.errors import MpitrainError

FORMAT = 1
CURVE_KINDS = ("allreduce", "halves")  # a collective curve times the all-reduce, or --zero's pair
REQUIRED = ("cores_per_node", "gemm_flops_per_s", "memory_bandwidth_per_core", "memory_bandwidth_per_node", "links")
OPTIONAL = {"name": "", "source": "", "gemm": [], "op_overhead_s": 0.0, "message_overhead_s": 0.0,
            "step_overhead_s": 0.0, "overlap_efficiency": 0.0, "collectives": [], "stream": [],
            "stream_alone_factor": 1.0}

# The scalars of `mpitrain plan --calibrate` (inside benchmarks/plan_vs_measured.py --calibrate,
# 2 ranks, 2026-11-30) on the project's 2-core development machine, MPICH 5.0.2 over shared memory,
# while other jobs shared the machine (see README, Predicted against measured); no GEMM shapes or
# collective curves, so the alpha-beta formulas stand for them. "inter" is a guess for a 10 Gbit/s
# link: this machine has no second node. float64 is half the float32 rate, not measured.
BUILTIN = {
    "format": FORMAT, "name": "2-core development machine",
    "source": "mpitrain plan --calibrate, 2 ranks on 2 cores, 2026-11-30 (README: Predicted against measured)",
    "cores_per_node": 2, "gemm_flops_per_s": {"float32": 3.22e10, "float64": 1.6e10},
    "memory_bandwidth_per_core": 3.8e9, "memory_bandwidth_per_node": 8.96e9,
    "stream": [{"bytes": 81920, "bytes_per_s": 3.24e10}, {"bytes": 327680, "bytes_per_s": 5.09e10},
               {"bytes": 1310720, "bytes_per_s": 6.01e10}, {"bytes": 5242880, "bytes_per_s": 2.2e10},
               {"bytes": 20971520, "bytes_per_s": 8.3e9}, {"bytes": 83886080, "bytes_per_s": 5.91e9},
               {"bytes": 335544320, "bytes_per_s": 4.7e9}],
    "op_overhead_s": 4.6e-7, "message_overhead_s": 0.0, "step_overhead_s": 1.6e-3, "overlap_efficiency": 0.0,
    "links": {"intra": {"alpha_s": 6.5e-5, "beta_s_per_byte": 7.3e-10},
              "inter": {"alpha_s": 5e-5, "beta_s_per_byte": 8e-10}},
}


def builtin() -> dict:
    """A copy of the built-in profile (the development machine; see BUILTIN's comment)."""
    return check(json.loads(json.dumps(BUILTIN)), "built-in profile")


def _positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MpitrainError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def _non_negative(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise MpitrainError(f"{where}: expected a number >= 0, got {value!r}")
    return float(value)


def _link(entry, where: str) -> dict:
    if not isinstance(entry, dict):
        raise MpitrainError(f"{where}: expected an object with alpha_s and beta_s_per_byte")
    return {"alpha_s": _non_negative(entry.get("alpha_s"), f"{where}.alpha_s"),
            "beta_s_per_byte": _positive(entry.get("beta_s_per_byte"), f"{where}.beta_s_per_byte")}


def check(profile, where: str) -> dict:
    """The profile with defaults filled in, or MpitrainError naming the first bad field."""
    if not isinstance(profile, dict) or profile.get("format") != FORMAT:
        raise MpitrainError(f"{where}: not an mpitrain machine profile of format {FORMAT} (see `mpitrain plan --help`)")
    for name in REQUIRED:
        if name not in profile:
            raise MpitrainError(f"{where}: field '{name}' is missing")
    out = {**OPTIONAL, **profile}
    cores = out["cores_per_node"]
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise MpitrainError(f"{where}: cores_per_node: expected a positive integer, got {cores!r}")
    if not isinstance(out["gemm_flops_per_s"], dict) or not out["gemm_flops_per_s"]:
        raise MpitrainError(f"{where}: gemm_flops_per_s: expected {{dtype: FLOP/s}}, like {{\"float32\": 5e10}}")
    for dtype, rate in out["gemm_flops_per_s"].items():
        _positive(rate, f"{where}: gemm_flops_per_s.{dtype}")
    for name in ("memory_bandwidth_per_core", "memory_bandwidth_per_node", "stream_alone_factor"):
        _positive(out[name], f"{where}: {name}")
    for name in ("op_overhead_s", "message_overhead_s", "step_overhead_s"):
        _non_negative(out[name], f"{where}: {name}")
    if not 0 <= _non_negative(out["overlap_efficiency"], f"{where}: overlap_efficiency") <= 1:
        raise MpitrainError(f"{where}: overlap_efficiency: expected a share between 0 and 1")
    links = out["links"]
    if not isinstance(links, dict) or "intra" not in links:
        raise MpitrainError(f"{where}: links: expected {{\"intra\": {{alpha_s, beta_s_per_byte}}, \"inter\": ...}}")
    out["links"] = {"intra": _link(links["intra"], f"{where}: links.intra"),
                    "inter": _link(links.get("inter", links["intra"]), f"{where}: links.inter")}
    if not isinstance(out["gemm"], list):
        raise MpitrainError(f"{where}: gemm: expected a list of {{dtype, m, k, n, flops_per_s}}")
    for i, entry in enumerate(out["gemm"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
            raise MpitrainError(f"{where}: gemm[{i}]: expected {{dtype, m, k, n, flops_per_s}}")
        for key in ("m", "k", "n", "flops_per_s"):
            _positive(entry.get(key), f"{where}: gemm[{i}].{key}")
        entry.setdefault("threads", 1)
        _positive(entry["threads"], f"{where}: gemm[{i}].threads")
    if not isinstance(out["stream"], list):
        raise MpitrainError(f"{where}: stream: expected a list of {{bytes, bytes_per_s}}")
    for i, entry in enumerate(out["stream"]):
        if not isinstance(entry, dict):
            raise MpitrainError(f"{where}: stream[{i}]: expected {{bytes, bytes_per_s}}")
        for key in ("bytes", "bytes_per_s"):
            _positive(entry.get(key), f"{where}: stream[{i}].{key}")
    if not isinstance(out["collectives"], list):
        raise MpitrainError(f"{where}: collectives: expected a list of {{algorithm, ranks, nodes, bytes, seconds}}")
    for i, entry in enumerate(out["collectives"]):
        ok = (isinstance(entry, dict) and isinstance(entry.get("algorithm"), str)
              and isinstance(entry.get("bytes"), list) and isinstance(entry.get("seconds"), list)
              and len(entry["bytes"]) == len(entry["seconds"]) > 0)
        if not ok:
            raise MpitrainError(f"{where}: collectives[{i}]: expected {{algorithm, ranks, nodes, bytes: [...], "
                                "seconds: [...]}} of equal lengths")
        for key in ("ranks", "nodes"):
            _positive(entry.get(key), f"{where}: collectives[{i}].{key}")
        if entry.setdefault("kind", "allreduce") not in CURVE_KINDS:
            raise MpitrainError(f"{where}: collectives[{i}].kind {entry['kind']!r}: expected one of "
                                f"{', '.join(CURVE_KINDS)}")
        for j, (size, seconds) in enumerate(zip(entry["bytes"], entry["seconds"])):
            _positive(size, f"{where}: collectives[{i}].bytes[{j}]")
            _positive(seconds, f"{where}: collectives[{i}].seconds[{j}]")
    return out


def load(path: str) -> dict:
    """The checked profile in a JSON file; MpitrainError naming the file and the problem."""
    try:
        with open(path) as handle:
            contents = json.load(handle)
    except FileNotFoundError:
        raise MpitrainError(f"--profile {path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise MpitrainError(f"--profile {path}: cannot read a JSON machine profile ({exc})") from None
    return check(contents, f"--profile {path}")


def save(profile: dict, path: str) -> None:
    """Write the checked profile as JSON, atomically (mpitrain/outputs.py)."""
    from mpitrain.outputs import atomic_write

    text = json.dumps(check(profile, "profile"), indent=1).encode()
    atomic_write(path, lambda out: out.write(text), binary=True)


def default_profile_path() -> str:
    """$MPITRAIN_PROFILE, else $XDG_CACHE_HOME/mpitrain/machine-profile.json (~/.cache by default)."""
    if os.environ.get("MPITRAIN_PROFILE"):
        return os.environ["MPITRAIN_PROFILE"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mpitrain", "machine-profile.json")


def load_profile(path: str | None) -> dict:
    """--profile, else the calibrated default file when it exists, else the built-in profile."""
    if path is None:
        path = default_profile_path()
        if not os.path.exists(path):
            return builtin()
    return load(path)
