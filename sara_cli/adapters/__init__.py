"""The adapters: the layer contract (`base.py`), one module per method behind `registry.py`,
wrapping and freezing (`inject.py`), initialisation from the checkpoint files (`initialize.py`),
adapter files and a run's model (`checkpoint.py`) and Mo-SARA gate recording (`gates.py`).
May import model and the bottom modules."""
