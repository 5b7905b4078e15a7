"""The build: plan, stages, one row per (target, precision), the grid, the output and the choice of a bundle."""
