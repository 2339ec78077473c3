"""Train and evaluate from Python: a config, a callback, the history, the parameters.

    python examples/api.py                    # one process
    mpirun -n 2 python examples/api.py        # the same run on two ranks (the same global batch)

Writes a small synthetic set, trains a 20-32-4 MLP with a cosine schedule, stops early once the
validation accuracy reaches 0.95 (a callback), keeps the best epoch's parameters, and scores the
saved model on the training file. Every rank runs this whole script; rank 0 prints.
"""

import os
import shutil
import tempfile

from mpi4py import MPI

from mpitrain import Callback, MpitrainError, TrainConfig, evaluate, train
from mpitrain.comm import install_abort_handler
from mpitrain.data import synth


class StopAt(Callback):
    """Ask every rank to stop once an epoch reaches the target accuracy (the ranks agree)."""

    def __init__(self, accuracy: float):
        self.accuracy = accuracy

    def on_epoch_end(self, record: dict) -> bool:
        return record.get("val_accuracy", 0.0) >= self.accuracy


def main() -> None:
    install_abort_handler()  # an unexpected exception on one rank ends the job instead of hanging it
    comm = MPI.COMM_WORLD
    folder = comm.bcast(tempfile.mkdtemp(prefix="mpitrain-api-") if comm.rank == 0 else None)
    data = os.path.join(folder, "train.h5")
    if comm.rank == 0:
        x, y = synth.make_classification(2000, 20, 4, seed=1)
        synth.write_h5(data, x, y)
    comm.Barrier()

    try:
        TrainConfig(optimizer="rmsprop")
    except MpitrainError as error:  # the same check and message as `mpitrain train --optimizer rmsprop`
        if comm.rank == 0:
            print(f"refused: {error}")

    config = TrainConfig(data=data, model="20-32-4", epochs=20, batch_size=64, lr=3e-3, schedule="cosine",
                         device="cpu", progress=False, save_best=os.path.join(folder, "best.h5"))
    result = train(config, callbacks=[StopAt(0.95)])
    metrics = evaluate(config.save_best, data)
    if comm.rank == 0:
        print(f"{len(result.history)} epochs; val_accuracy by epoch: "
              + " ".join(f"{record['val_accuracy']:.3f}" for record in result.history))
        print(f"parameters: {', '.join(f'{name} {value.shape}' for name, value in result.parameters.items())}")
        print(f"stopped: {result.summary['stopped']}; best epoch {result.summary['best_epoch']}, "
              f"its accuracy on the training file {metrics['accuracy']:.3f}")
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
