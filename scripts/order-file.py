#!/usr/bin/env python3
"""Turns callgrind profiles of the agent into a linker symbol-ordering file (scripts/order-file.sh).

Usage: order-file.py BINARY CALLGRIND_OUT...  > hot-functions.order
       order-file.py --matched BINARY ORDER_FILE   prints "FOUND LISTED": how many of the
                                                    file's names BINARY defines (a stale file
                                                    matches fewer; bench/dataplane.sh and
                                                    scripts/package.sh report it)

Keeps the functions of BINARY (callgrind's `ob=`) that ran at all, hottest (own instructions,
summed over the profiles) first, so the steady-state code shares the fewest pages. Functions that
ran only at start-up follow: they are mapped whatever their order. Prints to stderr how many
functions and bytes of .text that is, from `nm -S`.
"""
import os
import subprocess
import sys
from collections import defaultdict


def self_costs(path, binary, costs):
    obj = fn = None
    after_call = False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("ob="):
                obj = line[3:].strip()
            elif line.startswith("fn="):
                fn = line[3:].strip()
                if obj == binary:
                    costs[fn] += 0
            elif line.startswith("calls="):
                after_call = True  # the next cost line is the call's inclusive cost
            elif line[:1].isdigit() or line[:1] in "+-*":
                if after_call:
                    after_call = False
                elif obj == binary and fn is not None:
                    parts = line.split()
                    if len(parts) >= 2:
                        costs[fn] += int(parts[-1])


def defined_symbols(binary):
    nm = subprocess.run(["nm", "-S", "--defined-only", binary], capture_output=True, text=True,
                        check=True)
    return [line.split() for line in nm.stdout.splitlines()]


def matched(binary, order_file):
    with open(order_file) as f:
        listed = {line.strip() for line in f if line.strip()}
    names = {parts[-1] for parts in defined_symbols(binary) if parts}
    print(len(listed & names), len(listed))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--matched":
        return matched(sys.argv[2], sys.argv[3])
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    binary = os.path.realpath(sys.argv[1])
    costs = defaultdict(int)
    for p in sys.argv[2:]:
        self_costs(p, binary, costs)
    if not costs:
        sys.exit(f"no function of {binary} in the profiles: were they made with this binary?")
    sizes = {}
    for parts in defined_symbols(binary):
        if len(parts) == 4 and parts[2] in "tTwW":
            sizes[parts[3]] = int(parts[1], 16)
    text = sum(sizes.values())
    ordered = sorted(costs, key=lambda name: (-costs[name], name))
    hot = sum(sizes.get(n, 0) for n in ordered)
    for name in ordered:
        print(name)
    print(f"{len(ordered)} functions ran, {hot / 1e6:.2f} MB of {text / 1e6:.2f} MB of functions "
          f"in .text", file=sys.stderr)


if __name__ == "__main__":
    main()
