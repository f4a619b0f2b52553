"""Reading a base or a run: per-layer k for a tau (`analyze.py`) and Mo-SARA routing maps
(`routing.py`). May import evaluation, merging, training, data, adapters, model and the bottom
modules; nothing imports it but the cli."""
