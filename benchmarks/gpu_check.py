"""The Python half of `benchmarks/gpu_check.sh`: the wheel list, its checks, and the GPU measurements.

    python benchmarks/gpu_check.py requirements > benchmarks/gpu_requirements.txt   # pins, from this venv
    python benchmarks/gpu_check.py wheels WHEEL_DIR                                 # every pin has its wheel
    python benchmarks/gpu_check.py sections                                         # the bench parts it runs exist
    python benchmarks/gpu_check.py bench OUT_DIR                                    # measure (CUDA only)

A GPU machine lent for minutes has PyTorch but not vlmcache's other dependencies, and no network. Its wheels are
downloaded beforehand, each pinned with `--no-deps`: letting pip resolve open_clip_torch's or timm's dependencies
would fetch torch and its CUDA libraries again (gigabytes) for a machine that has them. So the pins are every
package vlmcache (with its `test` extra) needs, but NOT_NEEDED, walked through the installed packages' own
requirements for Python 3.12 on Linux x86_64, stopping at torch and torchvision: what torch needs comes with it.
With `--present` (the GPU machine's `pip list --format=freeze`), what it already has at a version that will do
is left out too, so that the wheel folder holds only what it lacks.

`requirements` and `wheels` import neither torch nor vlmcache, so they answer at once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "benchmarks" / "gpu_requirements.txt"
PREINSTALLED = {"torch", "torchvision"}  # the GPU machine's own; never pinned, never walked into
EXTRAS = ("test",)  # pytest (and what the test modules import) for the gpu-marked tests
# not needed on the GPU machine: ruff (the test extra's linter) and hdf5plugin (46 MB; only the cache_size bench
# section imports it, optionally, and the check does not run that section)
NOT_NEEDED = {"ruff", "hdf5plugin"}
# the GPU machine's interpreter and platform, for the requirements' environment markers
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# ExtractConfig's --decode modes measured on the GPU, and the bench sections the check runs beside them
DECODE_MODES = ("pil", "draft", "gpu")
SECTIONS = ("pipeline", "grouped")
OPTIONAL_SECTIONS = ("tail",)  # measured when `vlmcache bench` has them


def normalize(name: str) -> str:
    """A distribution's name as PEP 503 compares it (`Open_CLIP.torch` -> `open-clip-torch`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _roots() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return reqs


def read_present(path: Path) -> dict[str, str | None]:
    """What the GPU machine already has: `pip list --format=freeze` lines there (`name==version`), or bare names
    (then any version is taken to do) -> {normalized name: version or None}."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            out[normalize(name)] = version.strip() if sep else None
    return out


def pins(present: dict[str, str | None] | None = None) -> tuple[dict[str, str], list[str]]:
    """{name: version} of every package to download, and the names needed but not installed here. A package in
    `present` at a version that meets what asks for it is the machine's own: neither pinned nor walked into."""
    from importlib import metadata

    from packaging.requirements import Requirement

    present = present or {}
    found: dict[str, str] = {}
    missing: list[str] = []
    todo = [(Requirement(r), "") for r in _roots()]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**TARGET, "extra": extra}):
            continue
        name = normalize(req.name)
        if name in PREINSTALLED or name in NOT_NEEDED:
            continue
        if name in present and (present[name] is None or req.specifier.contains(present[name], prereleases=True)):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        for want in sorted(req.extras):
            for sub in dist.requires or ():
                todo.append((Requirement(sub), want))
        if name in found:
            continue
        found[name] = dist.version
        for sub in dist.requires or ():
            todo.append((Requirement(sub), ""))
    return dict(sorted(found.items())), sorted(set(missing))


def read_requirements(path: Path = REQUIREMENTS) -> dict[str, str]:
    """`name==version` lines (comments and blank lines skipped) -> {normalized name: version}."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"error: {path}: '{line}' is not pinned as name==version")
        out[normalize(name)] = version.strip()
    return out


def wheel_versions(folder: Path) -> dict[str, set[str]]:
    """{normalized name: versions} of the wheels in `folder` (`name-version-...-tag.whl`)."""
    out: dict[str, set[str]] = {}
    for wheel in folder.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        out.setdefault(normalize(name), set()).add(version)
    return out


def missing_wheels(folder: Path, path: Path = REQUIREMENTS) -> list[str]:
    have = wheel_versions(folder)
    return [f"{n}=={v}" for n, v in read_requirements(path).items() if v not in have.get(n, set())]


def check_sections() -> list[str]:
    """What the measurement needs from vlmcache, checked without a GPU: the bench sections it runs, the --decode
    modes it compares, and bench_extraction taking a decode mode."""
    import inspect

    from vlmcache.bench import SECTIONS as BENCH_SECTIONS
    from vlmcache.bench.extraction import bench_extraction
    from vlmcache.extract import DECODE_MODES as EXTRACT_MODES

    problems = [f"vlmcache bench has no section '{s}'" for s in SECTIONS if s not in BENCH_SECTIONS]
    problems += [f"vlmcache extract has no --decode {m}" for m in DECODE_MODES if m not in EXTRACT_MODES]
    if "decode" not in inspect.signature(bench_extraction).parameters:
        problems.append("bench_extraction takes no decode mode")
    return problems


def optional_sections() -> list[str]:
    from vlmcache.bench import SECTIONS as BENCH_SECTIONS

    return [s for s in OPTIONAL_SECTIONS if s in BENCH_SECTIONS]


def bench(
    out: Path, images: int, scale: str, device: str = "cuda", model: str = "ViT-B-16", precision: str = "fp16"
) -> None:
    """Measure on the GPU and write `gpu_section.md` (BENCHMARKS.md's section 6), `BENCHMARKS.md` (the repository's
    with that section in place) and `gpu_bench.json` (every figure) into `out`, again after each step, so that a
    run cut short by the machine's time limit still leaves what it measured. Extraction per --decode mode comes
    first: it is what no CPU can measure. `device`, `model` and `precision` are there to try the whole path on a
    CPU (`--device cpu --model vlmcache-tiny --precision fp32 --scale smoke`)."""
    import torch

    from vlmcache.bench import run_bench
    from vlmcache.bench.common import machine
    from vlmcache.bench.extraction import bench_extraction

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: the GPU measurements need one (use --dry-run to check without)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:6.0f} s]", *a, flush=True)  # noqa: E731
    r = {"scale": scale, "machine": machine(), "date": time.strftime("%Y-%m-%d"), "extraction": []}
    done: list[str] = []
    setup = {"images": images, "model": model, "precision": precision, "scale": scale}
    for mode in DECODE_MODES:
        if mode == "gpu" and device != "cuda":
            log("extraction: --decode gpu needs a CUDA device; left out")
            continue
        log(f"extraction: {model}, {precision}, --decode {mode} ...")
        r["extraction"].append(bench_extraction(model, images, device, precision, decode=mode))
        done = ["extraction"]
        write_results(out, r, done, setup)
    for name in [*SECTIONS, *optional_sections()]:
        part = run_bench(scale, device, log=log, only=[name])
        r.update({k: v for k, v in part.items() if k not in ("scale", "machine", "date", "only")})
        done.append(name)
        write_results(out, r, done, setup)
    log(f"written: {out / 'gpu_section.md'}, {out / 'BENCHMARKS.md'}, {out / 'gpu_bench.json'}")


def write_results(out: Path, r: dict, done: list[str], setup: dict) -> None:
    """gpu_bench.json, gpu_section.md and BENCHMARKS.md from the sections measured so far (`done`)."""
    from vlmcache.bench import _sections

    (out / "gpu_bench.json").write_text(json.dumps({**r, "sections": done}, indent=1, default=str) + "\n")
    m = r["machine"]
    lines = [
        "## 6. GPU",
        "",
        f"Measured by `bash benchmarks/gpu_check.sh` on {r['date']}: {m['gpu']}, {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']}, open_clip {m['open_clip']}. Extraction is {setup['model']} (random weights) at "
        f"{setup['precision']} with each `--decode` mode, {setup['images']} JPEGs of 500 x 375, against the bare "
        "encoder on the same batches (preprocessed on the CPU; the loader column is the CPU loader with PIL's full "
        "decode in every row, and `gpu`'s `cpu_decoded` is in gpu_bench.json); the simulated-encoder pipeline runs "
        f"on this machine's CPUs; the grid is `vlmcache bench --scale {setup['scale']} --only grouped` on the GPU. "
        f"Sections measured: {', '.join(done)}.",
    ]
    for part in _sections({**r, "only": done}):
        if part and part[0].startswith("## ") and not part[0].startswith("## 6."):
            lines += ["", "#" + part[0], *part[1:]]
    section = "\n".join(lines) + "\n"
    (out / "gpu_section.md").write_text(section)
    (out / "BENCHMARKS.md").write_text(with_section((ROOT / "BENCHMARKS.md").read_text(), section))


def with_section(existing: str, section: str) -> str:
    """`existing` (BENCHMARKS.md) with its section 6 replaced by `section`, or `section` added before section 7."""
    blocks = existing.rstrip("\n").split("\n## ")
    number = lambda b: b.split(".", 1)[0]  # noqa: E731
    body = [b for b in blocks[1:] if number(b) != "6"]
    at = next((i for i, b in enumerate(body) if number(b).isdigit() and int(number(b)) > 6), len(body))
    body.insert(at, section.rstrip("\n").removeprefix("## "))
    return "\n\n## ".join([blocks[0].rstrip("\n"), *(b.rstrip("\n") for b in body)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("requirements", help="print the pins, from the packages installed here")
    q.add_argument("--present", type=Path, help="the GPU machine's `pip list --format=freeze`: pin only the rest")
    w = sub.add_parser("wheels", help="check that a wheel folder holds every pin")
    w.add_argument("folder", type=Path)
    w.add_argument("--requirements", type=Path, default=REQUIREMENTS)
    sub.add_parser("sections", help="check the bench sections and decode modes the measurement uses")
    b = sub.add_parser("bench", help="measure on the GPU")
    b.add_argument("out", type=Path)
    b.add_argument("--images", type=int, default=2048, help="JPEGs per extraction (default 2048)")
    b.add_argument("--scale", default="default", help="vlmcache bench's scale for the other sections")
    b.add_argument("--device", default="cuda", help="cuda (default); cpu only to try the path")
    b.add_argument("--model", default="ViT-B-16")
    b.add_argument("--precision", default="fp16")
    a = p.parse_args(argv)
    if a.cmd == "requirements":
        found, missing = pins(read_present(a.present) if a.present else None)
        if missing:
            print(f"error: needed on Python 3.12 but not installed here: {', '.join(missing)}", file=sys.stderr)
            return 2
        if a.present:
            print(f"# Written by `python benchmarks/gpu_check.py requirements --present {a.present.name}`: what")
            print("# vlmcache[test] needs besides torch, torchvision and the GPU machine's own (docs/benchmarks.md).")
        else:
            print("# Written by `python benchmarks/gpu_check.py requirements` (docs/benchmarks.md): every package")
            print("# vlmcache[test] needs besides torch and torchvision, at the versions this project tests with.")
        print("\n".join(f"{n}=={v}" for n, v in found.items()))
        return 0
    if a.cmd == "wheels":
        if not a.folder.is_dir():
            print(f"error: the wheel folder {a.folder} does not exist (docs/benchmarks.md says how to make it)")
            return 2
        gone = missing_wheels(a.folder, a.requirements)
        if gone:
            print(f"error: {a.folder} lacks {len(gone)} wheel(s) of {a.requirements.name}: {', '.join(gone)}")
            return 2
        n = len(read_requirements(a.requirements))
        print(f"wheels: {n} pins of {a.requirements}, each with its wheel in {a.folder}")
        return 0
    if a.cmd == "sections":
        problems = check_sections()
        if problems:
            print("error: " + "; ".join(problems))
            return 2
        extra = optional_sections()
        print(
            f"bench: sections {', '.join(SECTIONS)} and --decode {', '.join(DECODE_MODES)} exist"
            + (f"; also measuring {', '.join(extra)}" if extra else f"; no {', '.join(OPTIONAL_SECTIONS)} section yet")
        )
        return 0
    bench(a.out, a.images, a.scale, a.device, a.model, a.precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
