"""Run every benchmark in bench/ (each writes bench/results/<name>.json) and print a summary."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_train.py", "bench_towers.py", "bench_features.py", "bench_library.py",
           "bench_hybrid.py", "evidence.py"]


def main(argv: list[str]) -> int:
    wanted = argv or SCRIPTS
    failed = []
    for name in wanted:
        script = HERE / name
        if not script.exists():
            print(f"-- {name}: not present, skipped")
            continue
        print(f"== {name}")
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script)])
        print(f"-- {name}: exit {rc} in {time.perf_counter() - t0:.0f} s")
        if rc:
            failed.append(name)
    print("results in", HERE / "results")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
