"""β sweeps: one run per grid point under one sweep folder, sharing one reference pass, and the reward-KL frontier
of the DPO paper drawn from what the runs measured (grid.py, runner.py, frontier.py)."""

from .frontier import Frontier, Point, frontier_of
from .grid import Grid, parse_grid
from .runner import SWEEP_FILE, run_sweep

__all__ = ["Frontier", "Grid", "Point", "SWEEP_FILE", "frontier_of", "parse_grid", "run_sweep"]
