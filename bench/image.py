"""kubetune's image: size per flavour and `kubetune --help` start time inside the container.

    python bench/image.py --out bench/results/image-cpu       # builds the CPU flavour from this checkout
    python bench/image.py --flavours cpu,cuda --compressed    # cuda: measured where it can be built

For each flavour: the image's size (podman's uncompressed size, and with --compressed the gzip size a
registry would store and a node would pull), its largest layers, and the wall time of `kubetune --help`
(median and min of --repeat runs after one warm-up): once for the whole `podman run` (container set-up
included: what a pod's start adds to the CLI's), once measured inside the container (the CLI alone), and once
on this host's venv for comparison. Writes OUT.json and OUT.md. Build and run go through tests/containers.py,
as the image tests do (podman + runc: scripts/install-containers.sh first).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from containers import build_image, image_labels, image_size_bytes, podman_env, run_in_image  # noqa: E402
from cpu_demo_timings import machine  # noqa: E402  (bench/cpu_demo_timings.py)

MIB = 2**20
CUDA_NOT_HERE = ("not built on this machine: the CUDA flavour needs nvidia/cuda from a registry and ~4 GB of CUDA "
                 "wheels (no registry is reachable here); build it with `make images FLAVOUR=cuda` where one is")
NOT_MEASURED = "not measured"
INSIDE = 'start=$(date +%s%N); kubetune --help >/dev/null; end=$(date +%s%N); echo $(( (end - start) / 1000 ))'


def _seconds(samples: list[float]) -> dict:
    return {"median": round(statistics.median(samples), 3), "min": round(min(samples), 3),
            "runs": [round(s, 3) for s in samples]}


def _repeat(fn, repeat: int) -> list[float]:
    fn()  # warm-up: page cache, podman's first-run state
    return [fn() for _ in range(repeat)]


def help_times(image: str, repeat: int) -> dict:
    def whole_run() -> float:
        start = time.perf_counter()
        result = run_in_image(image, ["--help"], memory="1Gi", timeout=300)
        assert result.returncode == 0, result.stderr
        return time.perf_counter() - start

    def inside() -> float:
        result = run_in_image(image, ["-c", INSIDE], command=["sh"], memory="1Gi", timeout=300)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip()) / 1e6

    return {"podman_run_s": _seconds(_repeat(whole_run, repeat)), "inside_s": _seconds(_repeat(inside, repeat))}


def host_help_s(repeat: int) -> dict:
    kubetune = shutil.which("kubetune") or str(Path(sys.executable).parent / "kubetune")

    def once() -> float:
        start = time.perf_counter()
        subprocess.run([kubetune, "--help"], check=True, capture_output=True, timeout=300)
        return time.perf_counter() - start

    return _seconds(_repeat(once, repeat))


def layers(image: str, top: int = 4) -> list[dict]:
    out = subprocess.run(["podman", "history", "--format", "json", image], env=podman_env(), check=True,
                         capture_output=True, text=True).stdout
    rows = [{"mib": round(layer["size"] / MIB, 1), "created_by": layer.get("CreatedBy", "")[:120]}
            for layer in json.loads(out) if layer.get("size")]
    return sorted(rows, key=lambda r: -r["mib"])[:top]


def compressed_bytes(image: str) -> int:
    """The image saved as one OCI archive, gzip -6: about what a registry stores and a node pulls (push
    compresses each layer with gzip)."""
    with subprocess.Popen(["podman", "save", "--format", "oci-archive", image], env=podman_env(),
                          stdout=subprocess.PIPE) as tar:
        gz = subprocess.run(["gzip", "-6", "-c"], stdin=tar.stdout, capture_output=True, check=True)
    return len(gz.stdout)


def measure(flavour: str, repeat: int, compressed: bool) -> dict:
    started = time.perf_counter()
    image = build_image(flavour)
    result = {"image": image, "build_s_cached_or_cold": round(time.perf_counter() - started, 1),
              "labels": {k: v for k, v in image_labels(image).items() if k.endswith(("revision", "version"))},
              "size_bytes": image_size_bytes(image), "largest_layers": layers(image)}
    if compressed:
        result["gzip_bytes"] = compressed_bytes(image)
    result["kubetune_help"] = help_times(image, repeat)
    return result


def markdown(data: dict) -> str:
    lines = ["# kubetune's image: size and `kubetune --help` start time", "",
             f"- date: {data['date']}", f"- command: `{data['command']}`",
             f"- machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, "
             f"{data['machine']['memory_gib']} GiB; podman + runc (scripts/install-containers.sh)",
             "- shared machine: other jobs ran at the same time; times are median and min of the repeats", "",
             "| flavour | size (uncompressed) | gzip (pulled) | `podman run … --help` s | `--help` inside s | commit |",
             "|---|---|---|---|---|---|"]
    for flavour, r in data["flavours"].items():
        if "why" in r:
            lines.append(f"| {flavour} | {NOT_MEASURED} | | | | {r['why']} |")
            continue
        gz = f"{r['gzip_bytes'] / MIB:.0f} MiB" if "gzip_bytes" in r else "–"
        run, inside = r["kubetune_help"]["podman_run_s"], r["kubetune_help"]["inside_s"]
        lines.append(f"| {flavour} | {r['size_bytes'] / MIB:.0f} MiB | {gz} | {run['median']} (min {run['min']}) "
                     f"| {inside['median']} (min {inside['min']}) | "
                     f"{r['labels'].get('org.opencontainers.image.revision', '?')[:12]} |")
    host = data["host_kubetune_help_s"]
    lines += ["", f"The same `kubetune --help` on this host's venv: {host['median']} s (min {host['min']}).", ""]
    for flavour, r in data["flavours"].items():
        if "largest_layers" in r:
            lines += [f"Largest layers ({flavour}):", ""]
            lines += [f"- {layer['mib']} MiB: `{layer['created_by']}`" for layer in r["largest_layers"]]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavours", default="cpu,cuda", help="comma-separated: cpu, cuda")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compressed", action="store_true", help="also gzip the image (a minute or two)")
    parser.add_argument("--cuda-here", action="store_true", help="try the CUDA build (needs a registry)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "image-cpu")
    args = parser.parse_args(argv)
    flavours = {}
    for flavour in args.flavours.split(","):
        if flavour == "cuda" and not args.cuda_here:
            flavours[flavour] = {"why": CUDA_NOT_HERE}
        else:
            flavours[flavour] = measure(flavour, args.repeat, args.compressed)
    data = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": "python bench/image.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(), "flavours": flavours, "host_kubetune_help_s": host_help_s(args.repeat)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(data) + "\n")
    print(markdown(data))


if __name__ == "__main__":
    main()
