#!/usr/bin/env python3
"""Per-request timestamps through both proxy pairs (issue 18), from `perf script` output of the
sendto/recvfrom/writev tracepoints that bench/hops.sh records during bench/dataplane.sh.

Every request of the load generator is followed through the processes it crosses, by the data
system calls each makes on that request's own sockets:

    load sends (L) -> VM proxy reads it (C) -> mesh proxy writes it to the app (N) ->
    app reads it (A) -> app writes the answer (A) -> mesh proxy reads it (N) ->
    VM proxy writes it to the client (C) -> load reads it (L)

The sockets of one request (L, C, N, A) are paired from the requests that had the path to
themselves (no other request in flight), where the order of calls is unambiguous; the pairing
then holds for every request on those connections. The hop between the two proxies is not
followed by socket: Isthmus carries every request on one HBONE connection, and the time spent
on it is inside "VM read -> mesh write" and "mesh read -> VM write".

Prints, for each pair, the mean of each segment over latency bands, and how much of the
request's time is in the proxy pair (its two segments plus the proxies' own wake-ups) against
waiting for the app and the load generator to be scheduled.

Usage: hops.py PERF_SCRIPT_TEXT PATH...   (the paths in the order bench/dataplane.sh ran them;
WARMUP in the environment as there, 2 s by default)
"""

import bisect
import os
import collections
import re
import sys

PROXY_COMM = {"isthmus": "isthmus-proxy", "isthmus-l7": "isthmus-proxy", "haproxy": "haproxy"}
LINE = re.compile(
    r"^\s*(\S+)\s+(\d+)/(\d+)\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+): (.*)$"
)
SENDS = ("sendto", "writev", "write")
BANDS = ((0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 0.999), (0.999, 1.0))
SEGMENTS = (
    "load>VM read",
    "VM read>mesh write",
    "mesh write>app read",
    "app",
    "app write>mesh read",
    "mesh read>VM write",
    "VM write>load read",
)
# Which segments are the proxy pair's: its own wake-ups and work (and the wire between them).
IN_PROXIES = (0, 1, 4, 5)
# bench/dataplane.sh's WARMUP: the load generator measures nothing sent before it.
WARMUP_US = float(os.environ.get("WARMUP", "2")) * 1e6


def parse(path):
    """Completed data system calls with a positive result: (µs, comm, pid, call, fd, bytes)."""
    entered = {}
    events = []
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            comm, pid, tid, t, kind, call, rest = m.groups()
            if kind == "enter":
                entered[tid] = int(rest.split(",")[0].split(":")[1], 16)
                continue
            fd = entered.pop(tid, None)
            ret = int(rest, 16)
            if fd is None or ret == 0 or ret >= 1 << 63:
                continue
            events.append((float(t) * 1e6, comm, int(pid), call, fd, ret))
    events.sort()
    return events


def requests(events, load):
    """(sent, answered, fd) of each complete request of the load generator."""
    out, sending = [], {}
    for t, _, pid, call, fd, ret in events:
        if pid != load:
            continue
        if call in SENDS:
            sending[fd] = [t, 0]
        elif fd in sending:
            sending[fd][1] += ret
            # The answer: nginx's headers and the 1,024-byte body.
            if sending[fd][1] >= 1150:
                out.append((sending[fd][0], t, fd))
                del sending[fd]
    return sorted(out)


def most_common_pairs(counter):
    best = {}
    for (a, b), _ in sorted(counter.items(), key=lambda kv: -kv[1]):
        best.setdefault(a, b)
    return best


def analyze(name, events, load):
    lo = min(e[0] for e in events if e[2] == load)
    hi = max(e[0] for e in events if e[2] == load)
    window = [e for e in events if lo <= e[0] <= hi]
    # The proxies: the two processes of the pair's command active in the window; the VM's is
    # the one that reads right after the load sends. The app: the busiest nginx process.
    busy = collections.Counter(e[2] for e in window if e[1] == PROXY_COMM[name])
    proxies = [p for p, _ in busy.most_common(2)]
    app = collections.Counter(e[2] for e in window if e[1] == "nginx").most_common(1)[0][0]
    first_after_send = collections.Counter()
    last_load_send = False
    for e in window:
        if e[2] == load:
            last_load_send = e[3] in SENDS
        elif last_load_send and e[2] in proxies:
            first_after_send[e[2]] += 1
            last_load_send = False
    vm = first_after_send.most_common(1)[0][0]
    mesh = next(p for p in proxies if p != vm)
    window = [e for e in window if e[2] in (load, vm, mesh, app)]
    times = [e[0] for e in window]
    # As the load generator: only what was sent after its warm-up.
    reqs = [r for r in requests(window, load) if r[0] >= lo + WARMUP_US]

    # Pair the sockets on requests that had the path to themselves.
    l2c, c2n, n2a = (collections.Counter() for _ in range(3))
    for i, (a, b, fd) in enumerate(reqs):
        if (i > 0 and reqs[i - 1][1] > a) or (i + 1 < len(reqs) and reqs[i + 1][0] < b):
            continue
        w = window[bisect.bisect_left(times, a) : bisect.bisect_right(times, b)]
        vm_read = [e for e in w if e[2] == vm and e[3] not in SENDS]
        app_read = [e for e in w if e[2] == app and e[3] not in SENDS]
        if not vm_read or not app_read:
            continue
        mesh_write = [e for e in w if e[2] == mesh and e[3] in SENDS and e[0] < app_read[0][0]]
        if not mesh_write:
            continue
        l2c[(fd, vm_read[0][4])] += 1
        c2n[(vm_read[0][4], mesh_write[-1][4])] += 1
        n2a[(mesh_write[-1][4], app_read[0][4])] += 1
    l2c, c2n, n2a = map(most_common_pairs, (l2c, c2n, n2a))

    calls = collections.defaultdict(list)
    for e in window:
        calls[(e[2], e[4], e[3] in SENDS)].append(e[0])

    def first(pid, fd, send, after, until):
        v = calls.get((pid, fd, send), [])
        i = bisect.bisect_left(v, after)
        return v[i] if i < len(v) and v[i] <= until else None

    rows = []
    for a, b, fd in reqs:
        c = l2c.get(fd)
        n = c2n.get(c)
        s = n2a.get(n)
        if s is None:
            continue
        marks = [a]
        for pid, sock, send in (
            (vm, c, False),
            (mesh, n, True),
            (app, s, False),
            (app, s, True),
            (mesh, n, False),
            (vm, c, True),
        ):
            t = first(pid, sock, send, marks[-1], b)
            if t is None:
                break
            marks.append(t)
        else:
            marks.append(b)
            rows.append([b - a] + [marks[i + 1] - marks[i] for i in range(7)])
    rows.sort()
    lat = [r[0] for r in rows]
    n = len(rows)
    if not n:
        # At high rates few requests have the path to themselves and the sockets stay unpaired.
        print(f"#### {name}: none of {len(reqs)} requests could be followed (try a lower RATE)")
        print()
        return
    print(f"#### {name}: {n} of {len(reqs)} requests followed (VM proxy pid {vm}, mesh {mesh})")
    print()
    print("| latency band | mean µs | " + " | ".join(SEGMENTS) + " | in the proxy pair |")
    print("|---|---:|" + "---:|" * (len(SEGMENTS) + 1))
    for lo_, hi_ in BANDS:
        part = rows[int(n * lo_) : int(n * hi_)]
        k = len(part)
        if not k:
            continue
        means = [sum(r[j] for r in part) / k for j in range(8)]
        inside = sum(means[1 + j] for j in IN_PROXIES)
        print(
            f"| p{lo_ * 100:g}–p{hi_ * 100:g} | {means[0]:.0f} | "
            + " | ".join(f"{m:.0f}" for m in means[1:])
            + f" | {inside:.0f} ({100 * inside / means[0]:.0f}%) |"
        )
    print()
    pct = lambda p: lat[min(n - 1, int(p * n))]
    print(
        f"Latency of the followed requests, µs: p50 {pct(0.5):.0f}, p90 {pct(0.9):.0f}, "
        f"p99 {pct(0.99):.0f}, p99.9 {pct(0.999):.0f}."
    )
    print()


def main():
    events = parse(sys.argv[1])
    paths = sys.argv[2:]
    loads = []
    for e in events:
        if e[1] == "http-load" and e[2] not in loads:
            loads.append(e[2])
    if len(loads) != len(paths):
        sys.exit(f"hops.py: {len(loads)} load generator runs in the trace, {len(paths)} paths given")
    for name, load in zip(paths, loads):
        if name in PROXY_COMM:
            analyze(name, events, load)


if __name__ == "__main__":
    main()
