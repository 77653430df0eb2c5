"""The run directory protocol: `RunDir` (every path of a run; rundir.py), checkpoints that resume exactly
(checkpoint.py), the metrics log (metrics.py), plots (plots.py), and `Source`, a finished run or adapter folder
as export and compare read it (source.py)."""

from .checkpoint import complete_checkpoints
from .metrics import read_metrics
from .plots import series, write_plots
from .rundir import STATE_FILE, RunDir
from .source import Source, resolve_source

__all__ = ["STATE_FILE", "RunDir", "Source", "complete_checkpoints", "read_metrics", "resolve_source", "series", "write_plots"]
