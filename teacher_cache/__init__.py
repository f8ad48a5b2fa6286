"""Stage one: teacher batch inference into a sharded, verifiable, resumable Zarr cache."""
