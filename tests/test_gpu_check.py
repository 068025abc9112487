"""benchmarks/gpu_check.sh, checked here without a GPU: its --dry-run passes with a complete wheel folder and names
what a short one lacks, its pins cover pyproject's dependencies, and its section 6 lands in BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = _module()


def _wheels(folder: Path, skip: str | None = None, only: set[str] | None = None) -> Path:
    """Empty files named as the pinned wheels are (what the dry run looks at: names and versions); with `only`, a
    folder for a machine that has the rest, with its own requirements.txt."""
    folder.mkdir()
    pins = gpu_check.read_requirements()
    if only is not None:
        pins = {n: v for n, v in pins.items() if n in only}
        (folder / "requirements.txt").write_text(
            "# what the machine lacks\n" + "".join(f"{n}=={v}\n" for n, v in pins.items())
        )
    for name, version in pins.items():
        if name != skip:
            (folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").touch()
    return folder


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_dry_run_passes_with_the_wheels_its_folder_lists(tmp_path):
    """A folder made for a machine that lacks only open_clip and faiss (the lent GPU machines have most packages)."""
    wheels = _wheels(tmp_path / "wheels", only={"open-clip-torch", "faiss-cpu"})
    result = _dry_run("--wheels", str(wheels), str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    for line in (
        "scripts parse",
        f"wheels: 2 pins of {wheels / 'requirements.txt'}, each with its wheel",
        "bench: sections pipeline, grouped and --decode pil, draft, gpu exist",
        "tests marked gpu: 6 in tests/test_gpu.py",
        f"results would go to {tmp_path / 'out'}",
        "dry run passed",
    ):
        assert line in result.stdout, result.stdout
    assert (tmp_path / "out").is_dir()


def test_dry_run_names_the_missing_wheel_and_the_bad_option(tmp_path):
    wheels = _wheels(tmp_path / "wheels", skip="h5py")
    result = _dry_run("--wheels", str(wheels))
    assert result.returncode == 2
    assert f"h5py=={gpu_check.read_requirements()['h5py']}" in result.stdout
    assert "lacks 1 wheel(s) of gpu_requirements.txt" in result.stdout  # no list of its own: every pin
    gone = _dry_run("--wheels", str(tmp_path / "nowhere"))
    assert gone.returncode == 2 and "does not exist" in gone.stdout
    bad = _dry_run("--wheel", "x")
    assert bad.returncode == 2 and "unknown option '--wheel'" in bad.stderr and "Traceback" not in bad.stderr


def test_pins_cover_every_dependency_but_torch():
    """Every pyproject dependency (and the test extra) has a pin that satisfies it; torch and torchvision, which
    the GPU machine brings, have none."""
    pins = gpu_check.read_requirements()
    assert "torch" not in pins and "torchvision" not in pins
    for line in gpu_check._roots():
        req = Requirement(line)
        name = gpu_check.normalize(req.name)
        if name in gpu_check.PREINSTALLED or name in gpu_check.NOT_NEEDED:
            continue
        assert name in pins, f"{name} is not pinned in benchmarks/gpu_requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} fails {req.specifier}"


def test_pins_leave_out_what_the_gpu_machine_has(tmp_path):
    """A package the machine has at a version that will do is neither pinned nor walked into; one too old is
    pinned; bare names count as any version."""
    present = tmp_path / "present.txt"
    present.write_text("faiss-cpu==1.15.1\nnumpy==1.0\npydantic\nopen_clip_torch\n")
    full, _ = gpu_check.pins()
    slim, missing = gpu_check.pins(gpu_check.read_present(present))
    assert not missing and {"faiss-cpu", "numpy", "pydantic", "open-clip-torch", "ftfy"} <= set(full)
    assert "faiss-cpu" not in slim and "pydantic" not in slim and "open-clip-torch" not in slim
    assert "pydantic-core" not in slim  # pydantic is the machine's, so what it needs is too
    assert slim["numpy"] == full["numpy"]  # numpy>=1.24 is not met by 1.0
    assert "ftfy" not in slim or "open-clip-torch" in slim  # reached only through open_clip


def test_gpu_section_replaces_section_6_and_keeps_the_rest():
    md = "# b\n\nintro\n\n## 5. Size\n\nfive\n\n## 6. GPU\n\nNot measured.\n\n## 7. Measured by hand\n\nseven\n"
    once = gpu_check.with_section(md, "## 6. GPU\n\nmeasured\n\n### 1. Extraction\n\nrows\n")
    assert "Not measured" not in once and once.count("## 6. GPU") == 1
    assert once.index("## 5. Size") < once.index("measured") < once.index("### 1. Extraction") < once.index("## 7.")
    assert gpu_check.with_section(once, "## 6. GPU\n\nagain\n").count("## 6. GPU") == 1
    added = gpu_check.with_section("# b\n\n## 5. Size\n\nfive\n\n## 7. Hand\n\nseven\n", "## 6. GPU\n\nnew\n")
    assert added.index("## 5.") < added.index("## 6. GPU") < added.index("## 7.")


def test_a_whole_bench_run_keeps_the_gpu_section_and_the_figures_by_hand():
    """`vlmcache bench` without --only rewrites BENCHMARKS.md: on a CPU it keeps a measured section 6 (it could only
    write "Not measured") and section 7, which it never writes; on a GPU its own section 6 wins."""
    from vlmcache.bench import kept_sections, splice

    existing = (
        "# old\n\n## Machine\n\nold cpu\n\n## 1. Extraction\n\nold rows\n\n## 6. GPU\n\n"
        "Measured by benchmarks/gpu_check.sh: H100 rows\n\n## 7. Measured by hand\n\ndemo 16 s\n"
    )
    new = "# new\n\n## Machine\n\nnew cpu\n\n## 1. Extraction\n\nnew rows\n\n## 6. GPU\n\nNot measured: no GPU.\n"
    on_cpu = splice(new, kept_sections(new, existing, gpu=False))
    assert "new rows" in on_cpu and "old rows" not in on_cpu and "new cpu" in on_cpu
    assert "H100 rows" in on_cpu and "Not measured" not in on_cpu
    assert on_cpu.index("## 6. GPU") < on_cpu.index("## 7. Measured by hand") and "demo 16 s" in on_cpu
    assert "(Measured by" not in on_cpu  # kept as they were, with no note of this run
    on_gpu = splice(new.replace("Not measured: no GPU.", "ran on the GPU"), kept_sections(new, existing, gpu=True))
    assert "ran on the GPU" in on_gpu and "H100 rows" not in on_gpu and "demo 16 s" in on_gpu
    for other in ("Not measured: none", "The extraction rows above ran on the GPU."):  # not the GPU check's
        unmeasured = existing.replace("Measured by benchmarks/gpu_check.sh: H100 rows", other)
        assert [k[0] for k in kept_sections(new, unmeasured, gpu=False)] == ["## 7. Measured by hand"]
