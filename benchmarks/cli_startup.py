"""How long `lora-dpo` takes to answer --help, beside `python -c "import torch"`, measured side by side.

    .venv/bin/python benchmarks/cli_startup.py [--rounds 5]

Each command runs `rounds` times, interleaved (the machine's speed drifts), in fresh processes; the table gives the
median wall time of each and its ratio to importing torch. A help that imports torch would be ~1.0x or more.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def commands() -> dict[str, list[str]]:
    cli = shutil.which("lora-dpo", path=str(BIN)) or "lora-dpo"
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "lora-dpo --help": [cli, "--help"],
        "lora-dpo train --help": [cli, "train", "--help"],
        "lora-dpo export --help": [cli, "export", "--help"],
        "lora-dpo recipes": [cli, "recipes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cmds = commands()
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.rounds):
        for name, cmd in cmds.items():
            start = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - start)
    torch_s = statistics.median(times['python -c "import torch"'])
    print(f"{'command':<28}{'median s':>10}{'vs import torch':>18}")
    for name, ts in times.items():
        print(f"{name:<28}{statistics.median(ts):>10.3f}{statistics.median(ts) / torch_s:>17.2f}x")


if __name__ == "__main__":
    main()
