"""`sara train`: the run folder and its rules (`rundir.py`), the Trainer subclass (`trainer.py`),
its callbacks (`callbacks.py`), multi-process support (`distributed.py`) and the run itself
(`train.py`). May import data, adapters, model and the bottom modules."""
