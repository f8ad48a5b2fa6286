"""`python -m pipeline ...` (also what `torchrun -m pipeline ...` runs)."""

from pipeline.cli import main

if __name__ == "__main__":  # DataLoader workers (forkserver) import this module again: no second run
    main()
