#!/usr/bin/env python3
"""Sums a `dmx bench --profile` chrome trace per top-level op (ops not nested in another op on the same
thread), so the table shows where the time of a UNet step or a VAE decode goes. Usage:
    scripts/profile_summary.py PREFIX.unet.json [top_n]"""
import collections
import json
import sys


def main():
    events = json.load(open(sys.argv[1]))
    if isinstance(events, dict):
        events = events.get("traceEvents", [])
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    spans = [e for e in events if e.get("ph") == "X"]
    spans.sort(key=lambda e: (e.get("tid"), float(e["ts"]), -float(e["dur"])))
    total = collections.Counter()
    calls = collections.Counter()
    end_by_tid = {}
    for e in spans:
        ts, dur, tid = float(e["ts"]), float(e["dur"]), e.get("tid")
        if ts < end_by_tid.get(tid, -1.0):
            continue  # nested inside a top-level op
        end_by_tid[tid] = ts + dur
        total[e["name"]] += dur
        calls[e["name"]] += 1
    whole = sum(total.values())
    print(f"{'op':32s} {'calls':>6s} {'seconds':>9s} {'share':>7s}")
    for name, us in total.most_common(top):
        print(f"{name:32s} {calls[name]:6d} {us / 1e6:9.3f} {100 * us / whole:6.1f}%")
    print(f"{'total (top-level ops)':32s} {sum(calls.values()):6d} {whole / 1e6:9.3f}")


if __name__ == "__main__":
    main()
