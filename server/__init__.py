"""fedmm ServerApp: aggregation, global evaluation, adapters and run reports."""
