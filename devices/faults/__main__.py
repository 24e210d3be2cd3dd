"""``python -m devices.faults``: check a plan, summarise or merge traces.

- ``check PLAN [--device ID ...] [--seed N]``: validate (status 2 and one
  line on stderr when it is bad); print the plan's canonical JSON, digest
  and seed.
- ``summary TRACE``: firings per device/fault and the trace digest (JSON).
- ``merge OUT TRACE...``: one trace of several device processes' traces.
"""

from __future__ import annotations

import argparse
import json
import sys

from devices.faults.plan import load_plan
from devices.faults.table import FaultError
from devices.faults.trace import merge_traces, read_trace, trace_digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devices.faults", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a plan")
    check.add_argument("plan")
    check.add_argument("--device", action="append", help="a device id the plan may name (repeat; default: any)")
    check.add_argument("--seed", type=int, help="override the plan's seed")
    summary = sub.add_parser("summary", help="firings per fault of a trace")
    summary.add_argument("trace")
    merge = sub.add_parser("merge", help="merge traces")
    merge.add_argument("out")
    merge.add_argument("traces", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            plan = load_plan(args.plan, devices=args.device, seed=args.seed)
            out = {"plan": plan.to_dict(), "digest": plan.digest, "seed": plan.seed}
        elif args.command == "summary":
            trace = read_trace(args.trace)
            out = {"plan": trace.plan, "seed": trace.seed, "digest": trace_digest(trace),
                   "firings": trace.summary()}
        else:
            merged = merge_traces(read_trace(path) for path in args.traces)
            with open(args.out, "w", encoding="ascii") as f:
                merged.write(f)
            out = {"out": args.out, "firings": len(merged.firings), "digest": trace_digest(merged)}
    except (FaultError, OSError) as e:
        print(f"{parser.prog} {args.command}: {e}", file=sys.stderr)
        return 2
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
