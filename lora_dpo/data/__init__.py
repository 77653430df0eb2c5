"""Data: rows from a file, a Hub dataset or a named source (sources.py) in any recognised format (formats.py,
examples.py), tokenised as the model sees them (tokenize.py) into preference pairs (pairs.py) or single
completions (examples.py), with a report (report.py); batches of either layout (batches.py); the order they are
trained in (order.py)."""
