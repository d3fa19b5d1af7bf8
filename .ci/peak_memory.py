"""Run a command and fail when one of its processes peaked above a resident-memory limit.

    python3 .ci/peak_memory.py --limit-gb 6 -- bash run.sh test

The peak is the largest resident set of any process the command started (the test runner itself,
notebook kernels, torchrun workers, CLI subprocesses), from the kernel's own accounting of every
finished descendant (`getrusage(RUSAGE_CHILDREN).ru_maxrss`), so nothing samples or slows the run.
The command's own exit status wins when it fails.
"""

import argparse
import resource
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit-gb", type=float, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    status = subprocess.call(command)
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"peak resident memory of any process of `{' '.join(command)}`: {peak_gb:.2f} GB "
          f"(limit {args.limit_gb:g} GB)", flush=True)
    if status != 0:
        return status
    if peak_gb > args.limit_gb:
        print(f"FAILED: {peak_gb:.2f} GB is over the {args.limit_gb:g} GB limit: find the test that raised it with "
              "SPD_LENS_TEST_MEMORY=memory.tsv bash run.sh test (one line per test: peak, current, children)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
