"""Run a Python module or script in this process, then write its peak resident memory as JSON.

    python bench/peak_memory.py REPORT_JSON -m MODULE ARGS...
    python bench/peak_memory.py REPORT_JSON SCRIPT ARGS...

The peak is VmHWM from /proc/self/status: the high-water mark of this process's own memory map
since exec. The parent cannot use wait4's ru_maxrss instead: a child started by fork or vfork
and exec keeps the parent's high-water mark, so under a benchmark process that holds a model it
reports the parent's size, not the child's.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_mib() -> tuple[float, str]:
    """(peak resident memory in MiB, where it came from)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "VmHWM"
    except OSError:
        pass
    import resource

    # Not Linux: ru_maxrss (KiB on Linux, bytes on macOS) may include the parent's pages.
    scale = 1024 if sys.platform.startswith("linux") else 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, "ru_maxrss"


def main() -> int:
    if len(sys.argv) < 3 or (sys.argv[2] == "-m" and len(sys.argv) < 4):
        sys.exit("usage: python bench/peak_memory.py REPORT_JSON (-m MODULE | SCRIPT) ARGS...")
    report, target, rest = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    sys.path[0] = str(REPO)  # as `python -m` from the repository root, not from bench/
    code = 0
    try:
        if target == "-m":
            sys.argv = [rest[0], *rest[1:]]
            runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, *rest]
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    finally:
        peak, source = peak_mib()
        report.write_text(json.dumps({"peak_mib": peak, "source": source}) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
