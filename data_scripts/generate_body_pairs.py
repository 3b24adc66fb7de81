"""Generate the body-pairs dataset of Experiment 1 (depth maps of one posed body, moved rigidly).

Usage (full size; about 2 minutes per 10,000 pairs with two workers on a 2-core machine):

    python data_scripts/generate_body_pairs.py --out data/body_pairs --train 10000 --val 1000 \
        --test 2000 --workers 2

The format and what a sample is are documented in ``diffcp/datasets/body_pairs.py``. The body is
anny (offline; its first construction fills a cache, see ``diffcp/bodies/anny.py``) unless
``--body smpl`` / ``smplx`` with ``--smpl-dir`` (or ``DIFFCP_SMPL_DIR``) names registered model
files. An existing output folder is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffcp.bodies import BODY_MODELS, load_body  # noqa: E402
from diffcp.datasets.body_pairs import PairSettings, fixed_body, generate  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/body_pairs", help="dataset folder (must not exist)")
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--body", choices=BODY_MODELS, default="anny")
    p.add_argument("--topology", default="anny", help="anny topology (e.g. notoes_collapse10pc)")
    p.add_argument("--smpl-dir", default=None, help="SMPL/SMPL-X model folder (else $DIFFCP_SMPL_DIR)")
    p.add_argument("--pose-seed", type=int, default=0)
    p.add_argument("--pose-scale", type=float, default=0.15, help="radians, per joint component")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--fov-deg", type=float, default=30.0)
    p.add_argument("--distance", type=float, nargs=2, default=(2.5, 3.5), metavar=("MIN", "MAX"))
    p.add_argument("--max-angle-deg", type=float, default=60.0)
    p.add_argument("--max-translation", type=float, default=0.5)
    p.add_argument("--num-points", type=int, default=1024)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if os.path.exists(args.out) and not args.overwrite:
        print(f"error: {args.out} already exists; pass --overwrite to replace it.", file=sys.stderr)
        return 2
    settings = PairSettings(image_size=args.image_size, fov_deg=args.fov_deg, distance=tuple(args.distance),
                            max_angle_deg=args.max_angle_deg, max_translation=args.max_translation,
                            num_points=args.num_points)
    kwargs = {"topology": args.topology} if args.body == "anny" else {"model_dir": args.smpl_dir}
    body = load_body(args.body, **kwargs)
    vertices, faces, info = fixed_body(body, args.pose_seed, args.pose_scale)
    counts = {s: n for s, n in (("train", args.train), ("val", args.val), ("test", args.test)) if n > 0}
    manifest = generate(args.out, vertices, faces, counts, seed=args.seed, settings=settings, body_info=info,
                        workers=args.workers, shard_size=args.shard_size, overwrite=args.overwrite,
                        progress=not args.no_progress, command=["python"] + sys.argv)
    print(f"wrote {sum(counts.values())} pairs to {args.out} in {manifest['duration_s']:.1f} s "
          f"({manifest['pairs_per_minute']} pairs/minute, {args.workers} worker(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
