"""The benchmark at SD 1.5's real size on a GPU, in one command:

    python -m benchmarks.gpu            # writes benchmarks/results/gpu.json and gpu.md

It is `python -m benchmarks.run --device cuda --dtype float16 --size sd15-real --name gpu`: SD 1.5's
UNet with random weights at 512 x 512 px and 30 steps, in half precision, every figure of the CPU
table (`cpu.json`, `cpu.md`) beside which it writes its own. Later arguments override these, e.g.
`--reps 3`, or `--device cpu --size tiny` (the test's smoke run).
"""

from __future__ import annotations

import sys

from .run import main as run_main

DEFAULTS = ["--device", "cuda", "--dtype", "float16", "--size", "sd15-real", "--name", "gpu"]


def main(argv: list[str] | None = None) -> int:
    return run_main([*DEFAULTS, *(sys.argv[1:] if argv is None else argv)], prog="python -m benchmarks.gpu")


if __name__ == "__main__":
    sys.exit(main())
