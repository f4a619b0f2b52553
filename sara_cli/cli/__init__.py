"""The command line: `app.py` holds one thin Typer function per command, `views.py` the rich
tables, progress and reports. The top of the pipeline: it may import every other package, and
imports torch, transformers and the stages lazily so that `sara --help` stays fast."""
