"""The `fedmm` command: deploy a federation across sites on Flower's deployment engine."""
