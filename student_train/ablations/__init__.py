"""`pipeline ablate`: a grid of student runs from one cache, and its report."""
