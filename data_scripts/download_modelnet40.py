#!/usr/bin/env python3
"""Download the full ModelNet40 (official ``modelnet40_ply_hdf5_2048.zip``), verify it, unpack it.

    python data_scripts/download_modelnet40.py ROOT [--url URL] [--sha256 HEX] [--attempts 3] [--force]

Unpacks ``ROOT/modelnet40_ply_hdf5_2048`` (then point ``folder=`` or the layout's parent at it).
The zip is verified (size against the server's Content-Length, sha256 when given, every member's
CRC, the layout) before it is unpacked atomically; a broken download is deleted and fetched again.
A thin wrapper around :func:`diffcp.datasets.modelnet40.download_modelnet40`. Exit status 0 on
success, 1 when every attempt failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffcp.datasets.modelnet40 import OFFICIAL_SHA256, OFFICIAL_URL, download_modelnet40  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to hold modelnet40_ply_hdf5_2048")
    parser.add_argument("--url", default=OFFICIAL_URL)
    parser.add_argument("--sha256", default=OFFICIAL_SHA256, help="expected sha256 of the zip (default: unknown, not checked)")
    parser.add_argument("--size", type=int, default=None, help="expected size of the zip in bytes")
    parser.add_argument("--attempts", type=int, default=3)
    parser.add_argument("--force", action="store_true", help="download even if a valid folder is there")
    args = parser.parse_args(argv)
    try:
        folder = download_modelnet40(args.root, url=args.url, sha256=args.sha256, size=args.size,
                                     attempts=args.attempts, force=args.force)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{folder}: ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
