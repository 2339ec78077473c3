"""`mpitrain plan`: predict the step time, memory and traffic of every layout before running it.

    profile.py    the machine profile (JSON): GEMM rates, memory bandwidth, link alpha/beta, curves
    cost.py       the cost model of one layout: bytes per rank (exact), memory per rank, step time
    search.py     every layout of a world size, its feasibility, the ranking and the pick
    calibrate.py  `mpitrain plan --calibrate`: measure a profile on the current allocation
    command.py    the subcommand: flags, table, --json, --plot

Nothing here trains; everything but calibrate.py is pure (no MPI message), so every rank of a job
that asks for `--layout auto` computes the same choice.
"""
