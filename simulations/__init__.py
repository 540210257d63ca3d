"""Launch fedmm federations on Flower's simulation engine and collect their results."""
