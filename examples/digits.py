"""Train, evaluate and predict on scikit-learn's bundled digits (1797 8x8 images, 10 classes).

    pip install -e ".[examples]"
    python examples/digits.py                 # 2 ranks; --ranks 4, --folder DIR
    python examples/digits.py --ranks 0       # one process, no mpirun

Runs the same commands a user types, printing each one: import the images as HDF5 (kept as
(N, 8, 8): mpitrain flattens them as it reads), split off a stratified test set, train with
--normalize standard, evaluate on the test file and write predictions for it.
"""

import argparse
import os
import shlex
import subprocess
import sys

import numpy as np


def mpitrain(ranks: int, *args: str) -> None:
    launcher = [os.path.join(os.path.dirname(sys.executable), "mpirun"), "-n", str(ranks)] if ranks else []
    command = [*launcher, sys.executable, "-m", "mpitrain", *args]
    print("$ " + " ".join(shlex.quote(part) for part in (["mpirun", "-n", str(ranks)] if ranks else [])
                          + ["mpitrain", *args]), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="ranks for train, eval and predict (0: no mpirun)")
    parser.add_argument("--folder", default="digits-run", help="where the files go (default ./digits-run)")
    args = parser.parse_args()
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install -e '.[examples]'")

    os.makedirs(args.folder, exist_ok=True)
    path = lambda name: os.path.join(args.folder, name)  # noqa: E731
    digits = load_digits()
    np.savez(path("digits.npz"), images=digits.images.astype(np.uint8), labels=digits.target)

    mpitrain(0, "data", "import", path("digits.npz"), "--out", path("digits.h5"), "--force")
    mpitrain(0, "data", "split", path("digits.h5"), "--train", path("train.h5"), "--test", path("test.h5"),
             "--test-fraction", "0.25", "--stratify", "--seed", "0", "--force")
    mpitrain(0, "data", "inspect", path("train.h5"))
    mpitrain(args.ranks, "train", "--data", path("train.h5"), "--model", "64-64-10", "--normalize", "standard",
             "--epochs", "30", "--batch-size", "64", "--lr", "3e-3", "--device", "cpu", "--no-progress",
             "--save", path("model.h5"))
    mpitrain(args.ranks, "eval", "--model-file", path("model.h5"), "--data", path("test.h5"),
             "--metrics", path("test-metrics.json"), "--device", "cpu")
    mpitrain(args.ranks, "predict", "--model-file", path("model.h5"), "--data", path("test.h5"),
             "--out", path("predictions.h5"), "--force", "--device", "cpu")

    import h5py

    with h5py.File(path("predictions.h5"), "r") as predictions, h5py.File(path("test.h5"), "r") as test:
        predicted, truth = predictions["class"][()], test["y"][()]
        print(f"first 10 predictions {predicted[:10].tolist()}, labels {truth[:10].tolist()}; "
              f"test accuracy {np.mean(predicted == truth):.3f}")


if __name__ == "__main__":
    main()
