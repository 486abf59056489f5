"""`kuavo-train convert`: bring users' data into LeRobot v3.0.

    kuavo-train convert rosbag BAGS... --out DIR [--map YAML] [--jobs N]   Kuavo ROS1 bags -> one dataset per task
    kuavo-train convert v21 SRC DST                                        a LeRobot v2.1 dataset -> a v3.0 copy

Each converter lives in `kuavo_train/data/`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

ROSBAG_EPILOG = """\
One bag = one episode, in the order given (a folder gives its *.bag files, sorted, not recursive).
Exit code: 0 every bag converted; 1 some bags failed (one line each; the dataset of the others
is written); 2 bad arguments or topic map, or no bag converted (nothing written).
"""


def cmd_rosbag(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never wait on a model hub
    _convert(args)


def _convert(args) -> None:
    from kuavo_train.data.rosbag.convert import NothingConverted, convert_bags, find_bags
    from kuavo_train.data.rosbag.topic_map import RosbagError, load_topic_map

    tmap = load_topic_map(args.map)
    updates = {}
    if args.instruction is not None:
        updates["instruction"] = args.instruction
    if args.val_fraction is not None:
        updates["split.val_fraction"] = args.val_fraction
        updates["split.val_episodes"] = None
    if updates:
        tmap = tmap.with_overrides("the command-line options", **updates)
    if args.jobs < 1:
        raise RosbagError(f"rosbag error: --jobs must be >= 1 (got {args.jobs})")
    bags = find_bags(args.bags)
    _quiet_video_encoders()
    try:
        result = convert_bags(bags, args.out, tmap, repo_id=args.repo_id, jobs=args.jobs,
                              progress=sys.stdout.isatty(), overwrite=args.overwrite, use_videos=not args.images)
    except NothingConverted as exc:
        if len(exc.failures) > 1:  # one bag's reason is the error line itself
            for f in exc.failures:
                print(f"failed: {f.bag}: {f.reason}", file=sys.stderr)
        raise
    for bag, note in result.notes:
        print(f"note: {bag}: {note}")
    for f in result.failures:
        print(f"failed: {f.bag}: {f.reason}", file=sys.stderr)
    if "val" not in result.splits:
        print("note: no val split (one episode, or --val-fraction 0): set val_episodes in the task config to train on it")
    splits = ", ".join(f"{k} {v}" for k, v in result.splits.items())
    print(f"dataset: {result.out} (repo_id {result.repo_id}): {len(result.episodes)} episodes, {result.frames} frames at "
          f"{result.fps} fps; splits {splits}; {len(result.failures)} of {len(bags)} bags failed; {result.seconds:.1f} s")
    if result.failures:
        sys.exit(1)


def _quiet_video_encoders() -> None:
    """FFmpeg prints "[mp4 @ ...] Starting second pass ..." for every video file: noise on the
    user's terminal. LeRobot hands FFmpeg's logging back to FFmpeg's own printer after each
    file, so the threshold is set in the libavutil that PyAV ships (best effort)."""
    try:
        import ctypes
        from pathlib import Path

        import av

        libs = Path(av.__file__).resolve().parent.parent / "av.libs"
        for lib in sorted(libs.glob("libavutil*.so*")):
            ctypes.CDLL(str(lib)).av_log_set_level(16)  # AV_LOG_ERROR
    except Exception:
        pass


def add_rosbag_parser(sub) -> None:
    r = sub.add_parser("rosbag", help="Kuavo ROS1 bags -> one LeRobot v3.0 dataset (one episode per bag)",
                       description="Convert Kuavo ROS1 bags of ONE task into a LeRobot v3.0 dataset, without ROS. "
                                   "Topics, units and alignment follow the topic map (default: configs/data/kuavo_rosbag.yaml).",
                       epilog=ROSBAG_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.set_defaults(fn=cmd_rosbag)
    r.add_argument("bags", nargs="+", metavar="BAGS_OR_DIRS", help=".bag files and/or folders of them")
    r.add_argument("--out", required=True, help="the dataset folder to create (e.g. data/kuavo/task1_moving_grasp)")
    r.add_argument("--map", default=None, help="topic map YAML (default: configs/data/kuavo_rosbag.yaml)")
    r.add_argument("--repo-id", dest="repo_id", default=None, help="dataset repo_id (default: kuavo/<name of --out>)")
    r.add_argument("--instruction", default=None, help="the task's instruction, stored with every frame (overrides the map)")
    r.add_argument("--jobs", type=int, default=1, help="processes reading and decoding bags (default 1)")
    r.add_argument("--val-fraction", dest="val_fraction", type=float, default=None,
                   help="share of episodes (the last ones) held out as the val split (default: the map's, 0.1)")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new dataset is complete)")
    r.add_argument("--images", action="store_true",
                   help="store PNG images instead of AV1 video (bigger, slower to load; for machines whose FFmpeg cannot encode)")


def cmd_v21(args) -> None:
    from kuavo_train.data.v21 import convert_v21

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local conversion: never wait on a hub
    out = convert_v21(args.src, args.dst, repo_id=args.repo_id)
    print(f"dataset: {out} (LeRobot v3.0; the original at {args.src} is unchanged)")


def add_v21_parser(sub) -> None:
    v = sub.add_parser("v21", help="a LeRobot v2.1 dataset -> a new v3.0 copy (the original is left unchanged)",
                       description="Convert a LeRobot v2.1 dataset (written by lerobot 0.3.x) into a LeRobot v3.0 "
                                   "dataset at DST with LeRobot's own converter, run on a copy. DST must not exist; it "
                                   "appears only once the conversion is complete and checked.")
    v.set_defaults(fn=cmd_v21)
    v.add_argument("src", help="the v2.1 dataset folder (meta/info.json with codebase_version v2.1)")
    v.add_argument("dst", help="where the v3.0 dataset is written (must not exist)")
    v.add_argument("--repo-id", default=None, help="repo id recorded in the new dataset (default: local/<folder name>)")


def add_convert_parser(sub) -> None:
    conv_help = "convert Kuavo rosbags or LeRobot v2.1 datasets to LeRobot v3.0"
    conv = sub.add_parser("convert", help=conv_help, description=conv_help)
    csub = conv.add_subparsers(dest="source", required=True)
    add_rosbag_parser(csub)
    add_v21_parser(csub)
