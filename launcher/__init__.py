"""Starting Flower's own processes, and the `fedmm` command line.

    cli.py         `fedmm certs|server|site|train|predict|evaluate|export`
    prepare.py     compose a run's config, resolve its data, check it before any process starts
    simulation.py  a federation on Flower's simulation engine (flower-superlink --simulation)
    deployment.py  a deployed federation: flower-superlink with TLS + node auth, `flwr run`
    flwr_cli.py    Flower's `flwr` CLI: connections, run, status, node registration
    processes.py   tagged process groups, teardown, health waits

Used by `fedmm` and by simulations/; it holds no model or aggregation logic.
"""
