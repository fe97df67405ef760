"""`embedtl serve` under load (issue "embedtl serve"), on loopback only; it stops by itself.

Data: 400 clip-art JPEGs in 5 classes made from the Tux Paint cut-outs (latency.py's
``clip_art``: flattened on white, <= 320 px, every file different), extracted at 224 px with the
default backbone; and a 10,000-row store of Fashion-MNIST (10,000 images at 64 px).

One `embedtl serve` process opens both stores. In each of ``--rounds`` rounds (the client
counts' order reversed every other round):

- ``embedtl extract`` of the 400 JPEGs as new files (the store deleted first, the ONNX export
  kept), a fresh process: its own ``images_per_second`` (scan to fold), and files / wall time;
- 1, 4 and 16 concurrent clients (threads of this process, keep-alive HTTP/1.1) each uploading
  the JPEGs to ``POST /api/search`` (k=10) in turn for ``--seconds``: requests/s (= images
  embedded per second), p50/p95 latency, errors, and the server's batches (from
  ``/api/health``).

Then ``POST /api/search`` by a random store row of the 10,000-row store, one client, 500
requests: p50/p95; and 200 malformed requests (random bytes, truncated JPEGs, a decompression
bomb, wrong fields, traversal paths, a body over the cap): no 5xx, and the server still answers.

Targets: embed throughput under 16 clients >= 2x under 1 client and >= 0.7x extract's rate
(medians over rounds); search by store row p50 <= 20 ms; 0 errors under load; 0 server errors
from the malformed requests. The server and the clients share this machine's cores.

    python benchmarks/serve.py [--rounds 3] [--seconds 20] [--work DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, write_result  # noqa: E402
from latency import clip_art  # noqa: E402

CLIENTS = (1, 4, 16)
TARGET_SCALING = 2.0
TARGET_VS_EXTRACT = 0.7
TARGET_ROW_P50_MS = 20.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "embedtl", *args]


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for field, name, data in files:
        head = (
            f'--{b}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{b}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={b}"


class Client:
    """One keep-alive HTTP/1.1 connection to the server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None):
        headers = {"content-type": ctype} if ctype else {}
        try:
            self.conn.request(method, path, body=body, headers=headers)
            r = self.conn.getresponse()
            data = r.read()
        except (ConnectionError, http.client.HTTPException, OSError):
            self.conn.close()  # the server closed it (e.g. after a refused body): reconnect
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            return 0, b""
        if r.getheader("connection", "").lower() == "close":
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        return r.status, data


def load_phase(port: int, jpegs: list[bytes], clients: int, seconds: float) -> dict:
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    bodies = [
        multipart({"k": "10", "store": "0"}, [("file", f"q{i}.jpg", d)])
        for i, d in enumerate(jpegs)
    ]

    def run(offset: int) -> None:
        c = Client(port)
        i = offset
        while time.perf_counter() < stop:
            body, ctype = bodies[i % len(bodies)]
            i += clients
            t = time.perf_counter()
            status, data = c.request("POST", "/api/search", body, ctype)
            dt = time.perf_counter() - t
            with lock:
                if status == 200 and b'"neighbors"' in data:
                    lat.append(dt)
                else:
                    errors[0] += 1

    before = health(port)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = health(port)
    m0, m1 = _model(before), _model(after)
    batches = m1["batches"] - m0["batches"]
    items = m1["items"] - m0["items"]
    lat.sort()
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors[0],
        "seconds": round(wall, 2),
        "requests_per_second": round(len(lat) / wall, 2),
        "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
        "p95_ms": round(1000 * lat[int(len(lat) * 0.95)], 1) if lat else None,
        "mean_batch": round(items / batches, 2) if batches else None,
    }


def health(port: int) -> dict:
    status, data = Client(port).request("GET", "/api/health")
    if status != 200:
        raise SystemExit(f"the server does not answer /api/health ({status})")
    return json.loads(data)


def _model(h: dict) -> dict:
    """The batched backbone of store 0 (the one the uploads go to): the busiest entry."""
    models = [v for k, v in h["models"].items() if not k.startswith("head ")]
    return max(models, key=lambda m: m["items"])


def row_searches(port: int, rows: int, n: int = 500, seed: int = 0) -> dict:
    rng = random.Random(seed)
    c = Client(port)
    lat = []
    errors = 0
    for _ in range(n):
        body, ctype = multipart({"store": "1", "row": str(rng.randrange(rows)), "k": "10"}, [])
        t = time.perf_counter()
        status, data = c.request("POST", "/api/search", body, ctype)
        lat.append(time.perf_counter() - t)
        errors += status != 200
    lat.sort()
    return {
        "requests": n,
        "errors": errors,
        "p50_ms": round(1000 * lat[n // 2], 2),
        "p95_ms": round(1000 * lat[int(n * 0.95)], 2),
    }


def bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def malformed(port: int, jpegs: list[bytes], n: int = 200, seed: int = 0) -> dict:
    """``n`` bad requests of 10 kinds, in turn; the status of each kind."""
    rng = random.Random(seed)
    c = Client(port)
    kinds = [
        lambda: (
            "POST",
            "/api/search",
            *multipart({}, [("file", "r.bin", rng.randbytes(rng.randrange(1, 50_000)))]),
        ),
        lambda: (
            "POST",
            "/api/search",
            *multipart(
                {}, [("file", "t.jpg", (j := rng.choice(jpegs))[: rng.randrange(10, len(j) // 2)])]
            ),
        ),
        lambda: ("POST", "/api/predict", *multipart({}, [("file", "bomb.png", bomb_png())])),
        lambda: ("POST", "/api/search", *multipart({}, [("file", "bomb.png", bomb_png())])),
        lambda: ("POST", "/api/search", *multipart({"k": "abc", "row": "1"}, [])),
        lambda: ("POST", "/api/search", *multipart({"row": str(rng.randrange(10**6, 10**9))}, [])),
        lambda: ("POST", "/api/search", rng.randbytes(2000), "multipart/form-data; boundary=zz"),
        lambda: (
            "GET",
            rng.choice(
                [
                    "/api/stores/0/rows/0/../../../../etc/passwd",
                    "/static/../_app.py",
                    "/api/stores/..%2F..%2Fetc/rows/1/image",
                    "/api/stores/0/rows/-5/image",
                    "/api/stores/0/rows/1e9/thumbnail",
                ]
            ),
            None,
            None,
        ),
        lambda: (
            "POST",
            "/api/search",
            *multipart({"store": "../../etc"}, [("file", "a.jpg", jpegs[0])]),
        ),
        lambda: (
            "POST",
            "/api/search",
            *multipart({}, [("file", "big.jpg", b"\xff\xd8" + b"\0" * 21_000_000)]),
        ),
    ]
    statuses: dict[int, dict[int, int]] = {}
    server_errors = 0
    for i in range(n):
        k = i % len(kinds)
        method, path, body, ctype = kinds[k]()
        status, _ = c.request(method, path, body, ctype)
        statuses.setdefault(k, {})
        statuses[k][status] = statuses[k].get(status, 0) + 1
        server_errors += status >= 500
    names = [
        "random bytes",
        "truncated JPEG",
        "bomb (predict)",
        "bomb (search)",
        "k not a number",
        "unknown row",
        "broken multipart",
        "traversal paths",
        "store ../../etc",
        "body over the cap",
    ]
    return {
        "requests": n,
        "server_errors": server_errors,
        "statuses": {names[k]: v for k, v in statuses.items()},
        "still_answers": health(port)["status"] == "ok",
    }


def model_rates(jpegs: list[bytes], cache: Path, seconds: float = 3.0) -> dict[int, float]:
    """The backbone alone (the server's Embedder, in this process, the server idle): images/s
    at batch 1 and at batch 16, the ceiling of what batching can gain."""
    from embedtl.engine import Embedder

    emb = Embedder("efficientnet_lite0", cache_dir=cache)
    xs = [emb.decode(d) for d in jpegs[:32]]
    emb(xs[:4])
    out = {}
    for b in (1, 16):
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            for i in range(0, len(xs), b):
                n += len(emb(xs[i : i + b]))
        out[b] = round(n / (time.perf_counter() - t), 1)
    return out


def extract_rate(jpeg_dir: Path, env: dict[str, str]) -> dict:
    store = None
    p = subprocess.run(
        cli("cache", "info", str(jpeg_dir), "--json"), env=env, capture_output=True, text=True
    )
    if p.returncode == 0:
        store = json.loads(p.stdout).get("store")
    if store:
        Path(store).unlink(missing_ok=True)
        for extra in Path(store).parent.glob(Path(store).name + ".*"):
            extra.unlink()
    t = time.perf_counter()
    p = subprocess.run(
        cli("extract", str(jpeg_dir), "--json"), env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"extract failed: {p.stderr[-2000:]}")
    r = json.loads(p.stdout)
    return {
        "images": r["n_images"],
        "images_per_second": round(r["images_per_second"], 2),
        "wall_seconds": round(wall, 2),
        "wall_images_per_second": round(r["n_images"] / wall, 2),
        "runtime": r["runtime"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--work", type=Path, default=None, help="keep data here (default: a temp dir)")
    a = ap.parse_args()

    import embedtl

    work = a.work or Path(tempfile.mkdtemp(prefix="embedtl-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EMBEDTL_CACHE": str(work / "cache"), "EMBEDTL_OFFLINE": "1"}
    tux, jpeg_dir, fm = work / "tux", work / "clip-400", work / "fashion-10k"
    if not jpeg_dir.is_dir():
        embedtl.export_dataset("tuxpaint-stamps", tux)
        clip_art(tux, jpeg_dir, 80)
    if not fm.is_dir():
        embedtl.export_dataset("fashion-mnist", fm, max_per_class=500)  # train+test: 10,000
    jpegs = [p.read_bytes() for p in sorted(jpeg_dir.rglob("*.jpg"))]
    print(
        f"{len(jpegs)} JPEGs, {sum(map(len, jpegs)) / len(jpegs) / 1e3:.0f} kB each",
        file=sys.stderr,
    )
    subprocess.run(cli("extract", str(jpeg_dir)), env=env, check=True)
    subprocess.run(cli("extract", str(fm), "--image-size", "64"), env=env, check=True)
    p = subprocess.run(
        cli("cache", "info", str(fm), "--image-size", "64", "--json"),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    fm_store = json.loads(p.stdout)["store"]
    head = work / "head"
    fit = cli("fit-head", str(jpeg_dir), "--out", str(head))
    subprocess.run(fit, env=env, check=True, capture_output=True)

    err = (work / "serve.stderr").open("w")
    proc = subprocess.Popen(
        cli("serve", str(jpeg_dir), fm_store, "--head", str(head), "--port", "0", "--json"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("serve did not start: " + (work / "serve.stderr").read_text()[-2000:])
        port = int(json.loads(line)["url"].rsplit(":", 1)[1].strip("/"))
        rows = len(embedtl.FeatureStore(fm_store))
        load_phase(port, jpegs[:8], 4, 3.0)  # warm up: the first passes allocate
        rounds = []
        for r in range(a.rounds):
            ext = extract_rate(jpeg_dir, env)
            alone = model_rates(jpegs, work / "cache")
            order = CLIENTS if r % 2 == 0 else tuple(reversed(CLIENTS))
            phases = {c: load_phase(port, jpegs, c, a.seconds) for c in order}
            rounds.append(
                {"extract": ext, "model_alone": alone, "phases": [phases[c] for c in CLIENTS]}
            )
            print(
                f"round {r + 1}: extract {ext['images_per_second']} img/s; "
                + ", ".join(
                    f"{c} clients {p['requests_per_second']} req/s (p50 {p['p50_ms']} ms, "
                    f"batch {p['mean_batch']})"
                    for c, p in ((c, phases[c]) for c in CLIENTS)
                ),
                file=sys.stderr,
            )
        by_row = row_searches(port, rows)
        bad = malformed(port, jpegs)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        err.close()

    rps = {
        c: [rd["phases"][i]["requests_per_second"] for rd in rounds] for i, c in enumerate(CLIENTS)
    }
    ext_rate = [rd["extract"]["images_per_second"] for rd in rounds]
    per_round = [rd["phases"] for rd in rounds]
    scaling = median([p[2]["requests_per_second"] / p[0]["requests_per_second"] for p in per_round])
    vs_extract = median(
        [
            rd["phases"][2]["requests_per_second"] / rd["extract"]["images_per_second"]
            for rd in rounds
        ]
    )
    alone = {b: median([rd["model_alone"][b] for rd in rounds]) for b in (1, 16)}
    ceiling = median([rd["model_alone"][16] / rd["model_alone"][1] for rd in rounds])
    errors = sum(p["errors"] for rd in rounds for p in rd["phases"])
    checks = {
        "16 clients / 1 client >= 2x": scaling >= TARGET_SCALING,
        "16 clients / extract >= 0.7x": vs_extract >= TARGET_VS_EXTRACT,
        "search by row p50 <= 20 ms": by_row["p50_ms"] <= TARGET_ROW_P50_MS,
        "0 errors under load": errors == 0,
        "0 server errors from malformed requests": bad["server_errors"] == 0
        and bad["still_answers"],
        "SIGTERM exits 0": code == 0,
    }
    result = {
        "machine": machine(),
        "jpegs": len(jpegs),
        "seconds_per_phase": a.seconds,
        "rounds": rounds,
        "median_requests_per_second": {c: median(v) for c, v in rps.items()},
        "median_extract_images_per_second": median(ext_rate),
        "model_alone_images_per_second": alone,
        "batching_ceiling_16_vs_1": round(ceiling, 3),
        "scaling_16_vs_1": round(scaling, 3),
        "ratio_16_vs_extract": round(vs_extract, 3),
        "search_by_row_10k": by_row,
        "malformed": bad,
        "exit_code_after_sigterm": code,
        "checks": checks,
    }
    m = result["machine"]
    md = [
        "# embedtl serve under load",
        "",
        f"{m['date']}, {m['cpu']} ({m['cores']} cores); the server, the clients and `extract` "
        "share the cores. "
        f"`python benchmarks/serve.py --rounds {a.rounds} --seconds {a.seconds:g}`.",
        "",
        f"Uploads: {len(jpegs)} clip-art JPEGs (<= 320 px) to `POST /api/search` (k=10), "
        "EfficientNet-Lite0 at 224 px on ONNX Runtime; each client keeps one connection and one "
        "request in flight.",
        "",
        "| clients | requests/s (median) | rounds | p50 ms | p95 ms | mean batch | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(CLIENTS):
        ph = [rd["phases"][i] for rd in rounds]
        md.append(
            f"| {c} | {median(rps[c]):.1f} | {', '.join(f'{x:.1f}' for x in rps[c])} | "
            f"{median([p['p50_ms'] for p in ph]):.0f} | {median([p['p95_ms'] for p in ph]):.0f} | "
            f"{median([p['mean_batch'] or 0 for p in ph]):.1f} | {sum(p['errors'] for p in ph)} |"
        )
    wall_rate = median([rd["extract"]["wall_images_per_second"] for rd in rounds])
    md += [
        "",
        f"- `embedtl extract` of the same {len(jpegs)} files as new files: "
        f"{median(ext_rate):.1f} images/s (its own `images_per_second`; rounds "
        f"{', '.join(f'{x:.1f}' for x in ext_rate)}); {wall_rate:.1f} by the fresh process's "
        "wall time.",
        f"- The backbone alone, in the benchmark's process: {alone[1]:.1f} images/s at batch 1, "
        f"{alone[16]:.1f} at batch 16: batching can gain at most **{ceiling:.2f}x** here.",
        f"- 16 clients / 1 client: **{scaling:.2f}x** (target >= {TARGET_SCALING:g}); 16 clients "
        f"/ extract: **{vs_extract:.2f}x** (target >= {TARGET_VS_EXTRACT:g}).",
        f"- Search by a random row of the {rows:,}-row Fashion-MNIST store (64 px), 500 "
        f"requests: p50 **{by_row['p50_ms']} ms**, p95 {by_row['p95_ms']} ms (target p50 <= "
        f"{TARGET_ROW_P50_MS:g} ms).",
        f"- {bad['requests']} malformed requests: {bad['server_errors']} server errors; the "
        f"server still answers: {bad['still_answers']}; SIGTERM: exit {code}.",
        "",
        "| malformed kind (20 each) | statuses |",
        "|---|---|",
        *(
            f"| {k} | {', '.join(f'{s}: {n}' for s, n in sorted(v.items()))} |"
            for k, v in bad["statuses"].items()
        ),
        "",
        "Checks: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()),
    ]
    write_result("serve", result, "\n".join(md))
    print("\n".join(md))
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
