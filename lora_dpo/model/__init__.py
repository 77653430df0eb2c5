"""The model: tokenizer and 4-bit base (load.py), the LoRA policy and its reference (adapters.py), the batch
layout decided once per run (layout.py), the one sampling loop (sampling.py), and the memory levers that act
on the loaded model: auto checkpointing, tiled MLPs, offloading (checkpointing.py, tiling.py, offload.py)."""
