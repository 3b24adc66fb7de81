"""Generate the body-scans dataset of the non-rigid fitting experiment (chapter 12).

Usage (the size of record; about 5 minutes on one core of a 2-core machine):

    python data_scripts/generate_body_scans.py --out data/body_scans --train 6000 --val 300 --test 600

What a scan is, and the format, are documented in ``diffcp/datasets/body_scans.py``. The body is
anny's low-resolution mesh (offline; its first construction fills a cache, see
``diffcp/bodies/anny.py``). An existing output folder is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffcp.bodies.anny import LOW_RESOLUTION, TOPOLOGIES, AnnyBody  # noqa: E402
from diffcp.bodies.placed import PlacedBody  # noqa: E402
from diffcp.datasets.body_scans import ScanSettings, generate_scans  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/body_scans", help="dataset folder (must not exist)")
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--test", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--topology", default=LOW_RESOLUTION, choices=TOPOLOGIES)
    p.add_argument("--image-size", type=int, default=ScanSettings.image_size)
    p.add_argument("--num-points", type=int, default=ScanSettings.num_points)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if os.path.exists(args.out) and not args.overwrite:
        print(f"error: {args.out} already exists; pass --overwrite to replace it.", file=sys.stderr)
        return 2
    placed = PlacedBody(AnnyBody(topology=args.topology))
    settings = ScanSettings(image_size=args.image_size, num_points=args.num_points)
    counts = {s: n for s, n in (("train", args.train), ("val", args.val), ("test", args.test)) if n > 0}
    manifest = generate_scans(args.out, placed, counts, seed=args.seed, settings=settings,
                              overwrite=args.overwrite, progress=not args.no_progress,
                              command=["python"] + sys.argv)
    print(f"wrote {sum(counts.values())} scans to {args.out} in {manifest['duration_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
