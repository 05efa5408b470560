"""Shape a container's own network interface like a home line, with ``tc`` (needs ``cap_add: NET_ADMIN``).

* **Upload** (bytes leaving the container): a ``tbf`` qdisc at the root of the interface.
* **Download** (bytes arriving): an ``ingress`` qdisc with a ``police`` filter that drops what exceeds
  the rate (TCP then settles at about that rate). Kernels without ``act_police`` get none; the
  caller then leaves download shaping to the user-space link emulator (``dmoe.sim.links``).
* **Latency** is not done here: ``netem`` is missing on many kernels (ours included), so the
  entrypoint puts ``dmoe.sim.links`` in front of the node's gRPC port for it.

Run standalone: ``python3 home_link.py --dev eth0 --up-mbit 20 --down-mbit 100`` (prints what it did).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass


@dataclass
class AppliedLink:
    dev: str
    up_mbit: float | None = None  # None: not shaped by tc
    down_mbit: float | None = None
    errors: list[str] | None = None


def _tc(*args: str) -> str | None:
    """Run ``tc ARGS``; the error text if it failed, else None."""
    try:
        proc = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip() or f"exit {proc.returncode}"


def _burst_bytes(mbit: float) -> int:
    # ~10 ms of traffic at the rate, and never below a few full-size packets (tbf needs burst >= MTU).
    return max(16 * 1024, int(mbit * 1e6 / 8 * 0.010))


def apply_home_link(*, dev: str = "eth0", up_mbit: float | None, down_mbit: float | None) -> AppliedLink:
    """Replace any shaping on ``dev`` with the given rates (None or inf = leave that direction alone)."""
    done = AppliedLink(dev=dev, errors=[])
    assert done.errors is not None
    _tc("qdisc", "del", "dev", dev, "root")  # absent on a fresh start: ignore the error
    _tc("qdisc", "del", "dev", dev, "ingress")
    if up_mbit and up_mbit != float("inf"):
        err = _tc("qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{up_mbit}mbit",
                  "burst", str(_burst_bytes(up_mbit)), "latency", "100ms")
        if err:
            done.errors.append(f"upload tbf: {err}")
        else:
            done.up_mbit = up_mbit
    if down_mbit and down_mbit != float("inf"):
        err = _tc("qdisc", "add", "dev", dev, "handle", "ffff:", "ingress") or _tc(
            "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "prio", "1", "u32",
            "match", "u32", "0", "0", "police", "rate", f"{down_mbit}mbit", "burst", str(_burst_bytes(down_mbit)),
            "drop", "flowid", ":1")
        if err:
            _tc("qdisc", "del", "dev", dev, "ingress")
            done.errors.append(f"download police: {err}")
        else:
            done.down_mbit = down_mbit
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev", default="eth0", help="interface to shape")
    parser.add_argument("--up-mbit", type=float, default=None, help="upload rate, Mbit/s")
    parser.add_argument("--down-mbit", type=float, default=None, help="download rate, Mbit/s")
    args = parser.parse_args(argv)
    done = apply_home_link(dev=args.dev, up_mbit=args.up_mbit, down_mbit=args.down_mbit)
    print(json.dumps(asdict(done)))
    return 1 if done.errors else 0


if __name__ == "__main__":
    sys.exit(main())
