"""``python -m transport.keys DIR [--client NAME ...]``: generate CURVE keys (see transport/curve.py).

    python -m transport.keys runs/keys                  # server + one client pair, the client authorized
    python -m transport.keys runs/keys --client node7   # one more client pair, also authorized

Then run with ``transport.curve_keys_dir=runs/keys``, and copy the folder to every machine of the job (a
stand-alone worker needs ``server.key`` and its own pair; only the coordinator needs ``server.key_secret``).
"""

from __future__ import annotations

import argparse
import sys

from transport.curve import generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transport.keys", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("keys_dir", help="folder for the keys (created); pass it as transport.curve_keys_dir")
    p.add_argument("--client", action="append", default=None, help="client pair name (repeatable; default client)")
    args = p.parse_args(argv)
    generate(args.keys_dir, tuple(args.client or ["client"]))
    print(f"CURVE keys in {args.keys_dir}; run with transport.curve_keys_dir={args.keys_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
