"""Bounded load test of `ssn-edge serve` on 127.0.0.1 against `ssn-edge bench` on the same bundle, in one run.

1. `bench_bundle` measures the bundle's own throughput (random input tensors, no HTTP, no decoding): the baseline.
2. `ssn-edge serve BUNDLE` starts in a subprocess (its RSS is the server's alone).
3. For each input kind, CLIENTS threads (tritonclient.http, binary tensors) send a fixed number of requests,
   stopping after --max-seconds whatever is left: `image_bytes` sends the dataset's PNG files as they are (the
   server decodes, resizes, scores: what a camera client does), `tensor` sends prepared FP32 tensors (HTTP and
   scoring only). Latency per request (client side), throughput, errors, the server's RSS after warm-up and at
   the end.
Records go to benchmarks/results/serve.json (runtime=server), with the ratio server / bench throughput
(ratio_of=server_vs_bench_throughput). On a 2-core machine the clients share the cores with the server.

    python benchmarks/serve_bench.py            # the bottle checkpoint exported to /tmp (INT8), 8 clients
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import command_line, record_results  # noqa: E402

DATA = ROOT / ".." / "shared" / "data" / "mvtec_ad_512" / "bottle" / "test"


CHECKPOINT = ROOT / "runs" / "bench" / "mvtec_bottle_unsupervised_default_cpu_redesign_s0" / "checkpoint.pt"
DEFAULT_BUNDLE = Path("/tmp/ssn_serve_bench/bottle_bundle")
# A speed benchmark: thresholds do not matter, so they come from the test split (no held-out normals needed).
EXPORT = ["--int8", "--calibration-size", "32", "--threshold-from", "test-f1"]


def default_bundle() -> Path | None:
    """The bottle benchmark checkpoint exported (FP32 + INT8) to /tmp once, or None without the checkpoint."""
    if (DEFAULT_BUNDLE / "metadata.json").is_file():
        return DEFAULT_BUNDLE
    if not CHECKPOINT.is_file():
        return None
    exe = Path(sys.executable).with_name("ssn-edge")
    print(f"exporting {CHECKPOINT} to {DEFAULT_BUNDLE} (once)")
    subprocess.run([str(exe), "export", "--checkpoint", str(CHECKPOINT), "--out", str(DEFAULT_BUNDLE), *EXPORT], check=True)
    return DEFAULT_BUNDLE


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _images(count: int) -> tuple[list[bytes], str]:
    """count PNG files of bottle's test split as they are on disk, or synthetic 512 px PNGs without the data."""
    files = sorted(DATA.glob("*/*.png"))
    if not files:
        import cv2

        print(f"{DATA}: absent (the shared data folder is not beside this checkout); sending synthetic 512 px PNGs")
        rng = np.random.default_rng(0)
        return [cv2.imencode(".png", (rng.random((512, 512, 3)) * 255).astype(np.uint8))[1].tobytes()
                for _ in range(count)], "synthetic"
    step = max(1, len(files) // count)
    return [p.read_bytes() for p in files[::step][:count]], "mvtec_bottle"


def _tensors(images: list[bytes], size: tuple[int, int]) -> list[np.ndarray]:
    from ssn_edge.runtime.preprocess import load_image_bytes, prepare, to_unit_float

    return [prepare(to_unit_float(load_image_bytes(b, "x")[0]), size)[None] for b in images]


@dataclass
class Load:
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _inputs(kind: str, item):
    import tritonclient.http as th

    if kind == "image_bytes":
        x = th.InferInput("image_bytes", [1], "BYTES")
        x.set_data_from_numpy(np.array([item], dtype=np.object_))
    else:
        x = th.InferInput(kind, list(item.shape), "FP32")
        x.set_data_from_numpy(item)
    return [x]


def run_load(url: str, model: str, kind: str, items: list, clients: int, requests: int, max_seconds: float) -> Load:
    import tritonclient.http as th

    load, lock = Load(), threading.Lock()
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        c = th.InferenceServerClient(url, connection_timeout=60, network_timeout=60)
        outputs = [th.InferRequestedOutput("score"), th.InferRequestedOutput("decision")]
        while time.perf_counter() < deadline:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            inputs = _inputs(kind, items[k % len(items)])
            t0 = time.perf_counter()
            try:
                c.infer(model, inputs, outputs=outputs)
                with lock:
                    load.latencies_ms.append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:  # counted, not fatal: the point is to see them
                with lock:
                    load.errors.append(str(exc)[:200])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.wall_s = time.perf_counter() - t0
    return load


def _start_server(bundle: Path, precision: str, port: int, queue: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("ssn-edge")
    cmd = [str(exe), "serve", f"bench={bundle}", "--port", str(port), "--precision", precision, "--queue", str(queue)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    import httpx

    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become ready in 60 s")


def _records(args, kind: str, load: Load, bench_ips: float, rss: tuple[float, float], base: dict) -> list[dict]:
    lat = np.asarray(load.latencies_ms)
    tput = len(lat) / load.wall_s if load.wall_s > 0 else 0.0
    variant = f"{kind}_c{args.clients}"
    rec = {**base, "variant": variant, "latency_ms": float(np.percentile(lat, 50)) if lat.size else None,
           "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None, "throughput_ips": tput,
           "requests": int(lat.size), "errors": len(load.errors), "clients": args.clients, "wall_s": load.wall_s,
           "rss_start_mb": rss[0], "rss_end_mb": rss[1], "bench_throughput_ips": bench_ips,
           "load_avg_1m": os.getloadavg()[0]}  # other work on the machine: the ratio is only fair when this is low
    ratio = {**base, "variant": variant, "ratio": tput / bench_ips, "ratio_of": "server_vs_bench_throughput"}
    return [rec, ratio]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help=f"default: {CHECKPOINT.relative_to(ROOT)} exported to {DEFAULT_BUNDLE}")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=600, help="per input kind")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="per input kind: stops then, whatever is left")
    ap.add_argument("--bench-seconds", type=float, default=5.0)
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--kinds", default="image_bytes,tensor")
    args = ap.parse_args()

    from ssn_edge.runtime.bench import bench_bundle
    from ssn_edge.runtime.bundle import load_bundle

    args.bundle = args.bundle or default_bundle()
    if args.bundle is None:
        print(f"{CHECKPOINT}: absent and no --bundle given; nothing to measure")
        return
    bundle = load_bundle(args.bundle)
    bench = bench_bundle(bundle, [args.precision], warmup=10, runs=50, throughput_seconds=args.bench_seconds)[0]
    print(f"ssn-edge bench {args.precision}: {bench['throughput_ips']:.1f} img/s, batch-1 median {bench['latency_ms']:.2f} ms")
    images, dataset = _images(32)
    input_name = None
    proc = _start_server(args.bundle, args.precision, args.port, queue=4 * args.clients)
    url = f"127.0.0.1:{args.port}"
    prov = bundle.metadata.provenance
    base = {"model": prov.model_kind, "dataset": dataset, "backbone": prov.backbone.name, "setting": prov.setting,
            "runtime": "server", "precision": args.precision, "command": command_line()}
    records = []
    try:
        import httpx

        input_name = httpx.get(f"http://{url}/v2/models/bench").json()["inputs"][0]["name"]
        for kind in args.kinds.split(","):
            items = images if kind == "image_bytes" else _tensors(images, bundle.input_size)
            name = "image_bytes" if kind == "image_bytes" else input_name
            run_load(url, "bench", name, items, args.clients, 4 * args.clients, 30)  # warm-up
            rss_start = _rss_mb(proc.pid)
            load = run_load(url, "bench", name, items, args.clients, args.requests, args.max_seconds)
            rss = (rss_start, _rss_mb(proc.pid))
            recs = _records(args, kind, load, bench["throughput_ips"], rss, base)
            r = recs[0]
            print(f"{kind:<12} {r['requests']} requests in {r['wall_s']:.1f} s, {r['errors']} errors: p50 {r['latency_ms']:.1f} ms, "
                  f"p99 {r['latency_p99_ms']:.1f} ms, {r['throughput_ips']:.1f} img/s = {recs[1]['ratio']:.2f} x bench; "
                  f"server RSS {rss[0]:.0f} -> {rss[1]:.0f} MB")
            if load.errors:
                print(f"  first error: {load.errors[0]}")
            records += recs
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"results: {record_results('serve', records)}")


if __name__ == "__main__":
    main()
