"""One module per stage. Each registers itself with `pipeline.stages.registry.stage`."""
