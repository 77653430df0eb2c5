"""Memory: the pure memory model that predicts a run's peak (plan.py), and the tracker that measures one on a GPU
or a CPU (track.py)."""
