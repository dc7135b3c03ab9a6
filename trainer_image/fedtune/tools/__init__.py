"""Tools a user runs around jobs: `chat` with a trained adapter, `report` of a run's losses, and `xfl`,
the import of the reference's (XFL's) configuration folders.

May import: `fedtune.train`, `fedtune.model`, the spec and the foundations."""
