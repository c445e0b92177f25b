"""Looking inside models: `summary` (per-layer shapes, parameters, FLOPs, receptive fields), `receptive_field`,
`pictures` (filters and feature maps). Import the submodules; this package imports nothing eagerly."""
