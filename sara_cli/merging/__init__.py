"""Leaving sara behind: the streaming merge into a plain checkpoint (`merge.py`), the PEFT export
(`export.py`) and the check that merged equals trained (`verify.py`). May import training, data,
adapters, model and the bottom modules."""
