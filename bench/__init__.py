"""The GPU benchmark of sara against PEFT (issue 7). Entry point: `python bench/run.py`.

Not part of the installed package; see docs/benchmarks.md.
"""
