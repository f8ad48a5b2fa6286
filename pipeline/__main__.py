"""`python -m pipeline ...` (also what `torchrun -m pipeline ...` runs)."""

from pipeline.cli import main

main()
