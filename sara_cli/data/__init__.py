"""Records -> prompts -> token ids: reading files and built-in data sets (`records.py`), prompt
templates (`prompts.py`), packing (`packing.py`) and tokenized splits (`dataset.py`). May import
model (for built-in references) and the bottom modules."""
