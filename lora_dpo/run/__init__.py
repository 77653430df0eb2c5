"""The run directory protocol: `RunDir` (every path of a run; rundir.py), checkpoints that resume exactly
(checkpoint.py), the metrics log (metrics.py), plots (plots.py), the phases of a run so far (phases.py), and
`Source`, a finished run or adapter folder as export and compare read it (source.py)."""

from .checkpoint import complete_checkpoints
from .metrics import read_metrics
from .phases import read_phases
from .plots import series, write_plots
from .rundir import STATE_FILE, RunDir
from .source import Source, resolve_source

__all__ = ["STATE_FILE", "RunDir", "Source", "complete_checkpoints", "read_metrics", "read_phases", "resolve_source", "series", "write_plots"]
