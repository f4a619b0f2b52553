"""Scoring a run or a checkpoint: the task rules and answer extraction (`tasks.py`), one function
per eval mode (`evaluate.py`), the lm-evaluation-harness bridge (`harness.py`) and `sara chat`
(`chat.py`). May import merging, training, data, adapters, model and the bottom modules."""
