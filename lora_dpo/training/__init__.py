"""Training: the loop as named phases (loop.py) after its setup (setup.py); the reference pass and its on-disk
cache (reference.py, refcache.py); the sampled probes and adaptive beta (probes.py); several processes
(distributed.py); resume checks (resume.py); stops (stopping.py)."""
