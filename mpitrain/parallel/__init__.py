"""Model parallelism: the process grid, tensor-sliced layers and their exchanges, the layer pipeline.

    grid.py       world = data-parallel x pipeline x tensor groups (Comm.Split), layout checks
    p2p.py        ring reduce-scatter / all-gather in point-to-point calls
    mappings.py   the named forward/backward exchange pairs of a tensor group
    layers.py     ColumnParallelLinear, RowParallelLinear, replicated Linear
    model.py      one pipeline stage of the MLP, sliced, in flat buffers
    pipeline.py   stage balancing, GPipe and 1F1B schedules, links between stages
    state.py      gather to / load from the one unsliced HDF5 layout
    train.py      the loop over the grid
    ps.py         parameter servers: sync, stale-synchronous and async SGD (--sync ps)
"""
