"""A base model: resolve a reference (`hub.py`, `builtin.py`), read and decompose its weights
(`spectrum.py`, `cache.py`), quantize (`quantize.py`) and load it (`loading.py`). The lowest stage:
it imports only the recipe schema and errors, files and names."""
