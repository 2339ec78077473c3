"""`mpitrain plot`: the curves of one or more --metrics files, overlaid, in one PNG.

    mpitrain plot run.jsonl --out run.png
    mpitrain plot adam.jsonl sgd.jsonl --out compare.png       # one colour per run, a legend

Four panels against the optimizer step: training loss (step records when the run had --log-every,
else per epoch) with the validation loss, validation accuracy, samples/s, and the learning rate.
The loss and learning-rate axes are logarithmic when their values span more than a factor of 10. Needs matplotlib
(the plot extra); one process, no MPI.
"""

import json
import math
import os

from mpitrain.errors import MpitrainError

PANELS = (("loss", "loss"), ("val_accuracy", "validation accuracy"), ("samples_per_s", "samples/s"),
          ("lr", "learning rate"))


def read_records(path: str) -> tuple[list[dict], list[dict]]:
    """(step records, epoch records) of a --metrics file; MpitrainError naming a bad file or line."""
    steps, epochs = [], []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise MpitrainError(f"{path}: line {number} is not JSON") from None
                if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
                    raise MpitrainError(f"{path}: line {number} is not a metrics record (no 'step')")
                if "epoch" in record:
                    epochs.append(record)
                elif not record.get("final"):
                    steps.append(record)
    except FileNotFoundError:
        raise MpitrainError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MpitrainError(f"{path}: cannot read the metrics file ({exc})") from None
    if not steps and not epochs:
        raise MpitrainError(f"{path}: no step or epoch records")
    return steps, epochs


def _series(records: list[dict], name: str) -> tuple[list, list]:
    points = [(r["step"], r[name]) for r in records
              if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
    return [x for x, _ in points], [y for _, y in points]


def figure(paths: list[str]):
    """The matplotlib Figure of the runs in `paths`: 4 axes (PANELS), one line colour per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MpitrainError("mpitrain plot needs the plot extra: pip install 'mpitrain[plot]' (matplotlib)") from None
    runs = [(path, *read_records(path)) for path in paths]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    spans = {"loss": [], "lr": []}
    for index, (path, steps, epochs) in enumerate(runs):
        colour, label = f"C{index}", os.path.basename(path)
        fine = steps or epochs  # the densest records a run has for what both kinds carry
        for ax, (name, _) in zip(axes.flat, PANELS):
            source = epochs if name == "val_accuracy" else fine
            x, y = _series(source, name)
            if name in spans:
                spans[name] += y
            if name == "loss":
                ax.plot(x, y, color=colour, label=f"{label} loss", alpha=0.8 if steps else 1.0)
                x, y = _series(epochs, "val_loss")
                spans["loss"] += y
                if x:
                    ax.plot(x, y, color=colour, linestyle="--", marker="o", markersize=3,
                            label=f"{label} val_loss")
            elif x:
                ax.plot(x, y, color=colour, label=label, marker="o" if source is epochs and len(x) < 30 else None,
                        markersize=3)
    for ax, (name, _) in zip(axes.flat, PANELS):
        positive = [v for v in spans.get(name, []) if v > 0]
        if positive and max(positive) > 10 * min(positive):
            ax.set_yscale("log")
    for ax, (_, title) in zip(axes.flat, PANELS):
        ax.set_title(title)
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize="small")
    if len(runs) > 1:
        axes.flat[1].legend(fontsize="small")
    fig.tight_layout()
    return fig


def run(paths: list[str], out: str) -> None:
    """Write the figure of `paths` to the PNG `out` (through the one atomic writer)."""
    from mpitrain.outputs import atomic_write, check_file

    check_file(out)
    fig = figure(paths)
    atomic_write(out, lambda handle: fig.savefig(handle, format="png", dpi=100), binary=True)
