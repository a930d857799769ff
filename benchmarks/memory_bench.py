"""Peak memory of `ssn-edge predict` against the number of images and against frame size.

    python benchmarks/memory_bench.py            # 100, 1000, 10000 images of 256x256 + ten 20-megapixel frames
    python benchmarks/memory_bench.py --counts 100 1000 --frames 3

Each run is a separate `ssn-edge predict` process; its peak RSS comes from /usr/bin/time -v. The bundle is a
plain (untiled) ResNet18 SSN at 256x256 (INT8, the default precision), trained for one epoch on MVTec AD bottle
(accuracy is irrelevant here; the graph, its weights and the runtime are the real ones). Images: bottle test
images at 256x256 (JPEG, quality 95), repeated to the count. Frames: bottle images upscaled to 5472x3648
(20 megapixels, JPEG): a plain bundle resizes each whole frame to its 256x256 input, and keeps the map at the
frame's size until it is written, so this measures decoding and the full-size map, one frame at a time.

Records (results/memory.json): peak_rss_mb per run, and the ratio of the largest count's peak to the smallest's
(flat memory: close to 1).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import command_line, record_results  # noqa: E402

RUNS = ROOT / "runs" / "bench" / "memory"
DATA = (ROOT / ".." / "shared" / "data" / "mvtec_ad_512" / "bottle").resolve()
WEIGHTS = (ROOT / ".." / "shared" / "weights" / "resnet18-imagenet1k-v1-to-layer3.pth").resolve()
RECIPE = ROOT / "recipes" / "mvtec_resnet18_cpu.yaml"
BASE = {"model": "ssn", "dataset": "mvtec_bottle", "backbone": "resnet18", "setting": "unsupervised", "runtime": "openvino"}
FRAME = (3648, 5472)  # (H, W): 20 megapixels


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def bundle() -> Path:
    """Train one epoch and export FP32 + INT8, once; reused afterwards."""
    out = RUNS / "bundle"
    if (out / "metadata.json").exists():
        return out
    train = RUNS / "train"
    if not (train / "checkpoint.pt").exists():
        run(cli("train", "--recipe", str(RECIPE), "--data", str(DATA), "--weights", str(WEIGHTS), "--epochs", "1",
                "--out", str(train)))
    run(cli("export", "--checkpoint", str(train / "checkpoint.pt"), "--int8", "--out", str(out), "--overwrite"))
    return out


def sources() -> list:
    files = sorted((DATA / "test").rglob("*.png"))
    return [cv2.imread(str(f)) for f in files[:: max(1, len(files) // 40)]]


def image_folder(count: int, images: list) -> Path:
    """count 256x256 JPEGs (the distinct bottle images, cycled)."""
    folder = RUNS / f"images_{count}"
    if folder.is_dir() and len(list(folder.iterdir())) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    encoded = [cv2.imencode(".jpg", cv2.resize(im, (256, 256), interpolation=cv2.INTER_AREA), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
               for im in images]
    for i in range(count):
        (folder / f"img{i:05d}.jpg").write_bytes(encoded[i % len(encoded)])
    return folder


def frame_folder(count: int, images: list) -> Path:
    folder = RUNS / f"frames_{count}"
    if folder.is_dir() and len(list(folder.iterdir())) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(count):
        big = cv2.resize(images[i % len(images)], (FRAME[1], FRAME[0]), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"frame{i:02d}.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return folder


def peak_rss(bundle_path: Path, folder: Path, precision: str) -> tuple[float, float, dict]:
    """(peak RSS MB, wall seconds, the run's summary) of one predict process."""
    out = RUNS / f"out_{folder.name}"
    cmd = ["/usr/bin/time", "-v", *cli("predict", str(bundle_path), str(folder), "--precision", precision, "--out", str(out))]
    t0 = time.perf_counter()
    proc = run(cmd)
    wall = time.perf_counter() - t0
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024.0
    summary = json.loads((out / "predictions.json").read_text())
    return rss, wall, {k: summary[k] for k in ("count", "failed", "inference_precision")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--frames", type=int, default=10, help="20-megapixel frames (0: skip)")
    parser.add_argument("--precision", default="int8")
    args = parser.parse_args()
    if not DATA.exists() or not WEIGHTS.exists():
        print(f"skipped: {DATA} or {WEIGHTS} is absent (the shared folder is not beside this checkout)")
        return
    RUNS.mkdir(parents=True, exist_ok=True)
    b = bundle()
    images = sources()
    records, peaks = [], {}
    for count in args.counts:
        rss, wall, summary = peak_rss(b, image_folder(count, images), args.precision)
        peaks[count] = rss
        print(f"{count} images 256x256: peak RSS {rss:.1f} MB, {wall:.1f} s, {summary}", flush=True)
        records.append({**BASE, "variant": f"predict_{count}_256px", "precision": args.precision, "images": count,
                        "image_size": [256, 256], "peak_rss_mb": round(rss, 1), "wall_s": round(wall, 1),
                        "throughput_ips": round(count / wall, 1), "command": command_line()})
    if len(peaks) > 1:
        lo, hi = min(peaks), max(peaks)
        records.append({**BASE, "variant": f"predict_{hi}_256px", "precision": args.precision, "ratio": round(peaks[hi] / peaks[lo], 3),
                        "ratio_of": f"peak_rss_{hi}_vs_{lo}_images", "command": command_line()})
        print(f"peak RSS {hi} / {lo} images: {peaks[hi] / peaks[lo]:.3f}")
    if args.frames:
        rss, wall, summary = peak_rss(b, frame_folder(args.frames, images), args.precision)
        print(f"{args.frames} frames {FRAME[1]}x{FRAME[0]}: peak RSS {rss:.1f} MB, {wall:.1f} s, {summary}")
        records.append({**BASE, "variant": f"predict_{args.frames}_frames_20mp", "precision": args.precision, "images": args.frames,
                        "image_size": list(FRAME), "peak_rss_mb": round(rss, 1), "wall_s": round(wall, 1),
                        "note": "plain bundle: each frame resized to the 256x256 input; map kept at frame size until written",
                        "command": command_line()})
    print(record_results("memory", records))


if __name__ == "__main__":
    main()
