"""The CLI answers at once and speaks briefly (issue 29): mistakes are answered before torch is imported, output is
one line per thing, Ctrl-C says what is kept, a cache is found by the flags that made it, and the small mistakes a
new user meets each get one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "torchvision", "h5py", "pandas", "faiss", "matplotlib")

# Each command below is a user mistake that needs no torch to see; the script runs them in one process (one
# interpreter start for all) and reports, after each, its exit code and which heavy libraries were imported.
_NO_TORCH_SCRIPT = """
import json, sys
from vlmcache.cli import app
heavy = {heavy!r}
found = []
for args in json.loads(sys.argv[1]):
    try:
        app(args, prog_name="vlmcache")
        code = 0
    except SystemExit as e:
        code = e.code
    found.append([args, code, sorted(m for m in heavy if m in sys.modules)])
print("RESULT " + json.dumps(found))
"""


def test_argument_errors_are_answered_before_torch_is_imported(tmp_path):
    (tmp_path / "a_file").write_text("x")
    cases = [
        ["extract", "--dataset", "inat18"],  # no --root: issue 29's example
        ["extract", "--dataset", "places_lt", "--root", str(tmp_path / "missing")],
        ["extract", "--dataset", "split"],  # no --split-file
        ["extract", "--dataset", "digits_lt", "--model", "ViT-B-61"],
        ["extract", "--dataset", "digits_lt", "--templates", "opnai"],
        ["extract", "--dataset", "digits_lt", "--decode", "fast"],
        ["extract", "--dataset", "digits_lt", "--batch-size", "0"],
        ["extract", "--dataset", "digits_lt", "--cache-dir", str(tmp_path / "a_file")],
        ["extract", "--dataset", "imagefolder", "--root", str(tmp_path), "--name", "../up"],
    ]
    script = _NO_TORCH_SCRIPT.format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    for args, code, imported in json.loads(line[len("RESULT ") :]):
        assert code == 2, (args, proc.stderr[-2000:])
        assert imported == [], f"{' '.join(args)} imported {imported} before answering"
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == len(cases)


def test_torch_free_model_names_are_open_clips():
    """extract checks --model against the model-config files before open_clip is imported; open_clip's own list
    must be the same, or a valid model would be refused (or a typo pass to the slow path)."""
    from vlmcache.encoders import list_models
    from vlmcache.extract_config import SEED_MAX, model_names
    from vlmcache.schemas import SEED_MAX as SCHEMA_SEED_MAX

    assert set(model_names()) == set(list_models())
    assert SEED_MAX == SCHEMA_SEED_MAX
