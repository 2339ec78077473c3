"""Which datasets of a file are inputs and labels: what a missing key's error and `data inspect` suggest."""

import os

import h5py


def numeric_datasets(f: h5py.File) -> list[h5py.Dataset]:
    """Every numeric dataset of an open file with at least one axis, in path order."""
    found = []

    def visit(_, node):
        if isinstance(node, h5py.Dataset) and node.dtype.kind in "iufb" and node.ndim >= 1:
            found.append(node)

    f.visititems(visit)
    return found


# Names people give inputs and labels, in the order they are tried (inspect and the error for a
# missing key suggest the first pair present with matching row counts).
KEY_PAIRS = [("x", "y"), ("X", "y"), ("data", "target"), ("data", "targets"), ("images", "labels"),
             ("features", "labels"), ("inputs", "targets"), ("x", "labels"), ("data", "labels")]


def suggest_keys(f: h5py.File) -> tuple[str, str] | None:
    """(x_key, y_key) of the first known pair of names, or of a dataset pair in one group, with equal rows."""
    groups = [""] + sorted({os.path.dirname(d.name.lstrip("/")) for d in numeric_datasets(f)} - {""})
    for group in groups:
        for x_name, y_name in KEY_PAIRS:
            x_key, y_key = (f"{group}/{x_name}", f"{group}/{y_name}") if group else (x_name, y_name)
            x, y = f.get(x_key), f.get(y_key)
            if isinstance(x, h5py.Dataset) and isinstance(y, h5py.Dataset) and x.ndim >= 2 and len(x) == len(y):
                return x_key, y_key
    return None
