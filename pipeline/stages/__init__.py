"""One module per stage. Each registers itself with `pipeline.registry.stage`."""
