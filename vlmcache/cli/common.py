"""What every command shares: the app, the consoles, error handling, and each option defined once.

Nothing here imports torch, open_clip, faiss or pandas: the commands import what they use inside their bodies, so
`vlmcache --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import unicodedata
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from vlmcache.choices import DATASETS, HEADS, LOSSES, PROTOCOLS, SAMPLERS, STAGE2
from vlmcache.errors import VlmcacheError, parse_key_values

# paths and commands stay on one line, for copying; no markup: a path, class or run name holding `[red]` prints as
# it is (the few styled words pass markup=True with the user's text escaped)
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)
log = functools.partial(err.print, highlight=False)

DatasetName = Enum("DatasetName", {k: k for k in DATASETS}, type=str)


def _version(value: bool) -> None:
    if value:
        try:
            out.print(f"vlmcache {version('vlmcache')}", highlight=False)
        except PackageNotFoundError:
            out.print("vlmcache (not installed: run from a source tree)")
        raise typer.Exit()


app = typer.Typer(
    help="Long-tailed classification with frozen CLIP encoders: extract features once, then train heads on the cache.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
    add_completion=False,
)


@app.callback()
def _main(
    _: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, metavar="", help="Print vlmcache's version and exit."
    ),
):
    """Long-tailed classification with frozen CLIP encoders: extract features once, then train heads on the cache.

    Start with [bold]vlmcache demo[/]; every command has --help with an example.
    """


def printable(text: str) -> str:
    """`text` with control and format characters escaped as Python writes them (\\x1b, \\x01): a name the user
    gave is echoed in an error, and must not colour or move the terminal."""
    return "".join(
        c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in ("Cc", "Cf") else c for c in text
    )


def user_errors(fn):
    """Print a VlmcacheError as one line on stderr and exit 2; a user mistake never shows a traceback. A command
    run in-process (tests, a notebook) leaves torch's thread count as it found it (`use_threads` sets it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch = sys.modules.get("torch")  # not imported here: a fresh process has no count to give back
        threads = torch.get_num_threads() if torch is not None else None
        try:
            return fn(*args, **kwargs)
        except VlmcacheError as e:
            err.print(f"[bold red]error:[/] {escape(printable(str(e)))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        finally:
            if threads is not None and torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    return wrapper


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def build_config(cls, params: dict, **overrides):
    """A job's config from a command's parameters: those named as the config's fields pass as they are (paths
    as strings, enums as their values), `X_param` KEY=VALUE lists become the `X_params` dicts; `overrides` are
    the renamed or computed ones. One place, so that train-head and finetune cannot build theirs differently."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in params.items():
        if key.endswith("_param") and f"{key}s" in names:
            kw[f"{key}s"] = parse_key_values(value, f"--{key.replace('_', '-')}")
        elif key in names:
            kw[key] = value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value
    return cls(**{**kw, **overrides})


def print_result(result: dict, as_json: bool, title: str) -> None:
    """An evaluation's result as one JSON object (less its per-class table) or as a metrics table."""
    result = {k: v for k, v in result.items() if k != "per_class"}
    if as_json:
        print_json(result)
    else:
        out.print(metrics_table(title, result["metrics"]))
        if result.get("predictions"):
            out.print(f"predictions: {result['predictions']}", highlight=False)


def metrics_table(title: str, metrics: dict) -> Table:
    table = Table(title=title)
    cols = ("overall", "many", "medium", "few", "top5", "mean_per_class")
    for col in cols:
        table.add_column(col.replace("_", " "), justify="right")
    table.add_row(*("-" if metrics.get(c) is None else f"{100 * metrics[c]:.2f}" for c in cols))
    return table


# --------------------------------------------------------------------------- options, each defined once
# One vocabulary: --runs-dir is where run folders go, --out is one run's own folder, --split is one split to
# evaluate on and --splits the splits to extract, --workers is image-loading processes (default min(8, CPUs)),
# and every switch has its --no- form.


def switch(name: str, help: str, default: bool | None = False):
    """A boolean option with its --no- form (`--tokens/--no-tokens`), shown without a type."""
    return typer.Option(default, f"--{name}/--no-{name}", metavar="", help=help)


JSON = switch("json", "Print one JSON object on stdout instead of tables.")
WAIT = switch(
    "wait",
    "If another vlmcache process is writing into the runs folder, wait for it to finish (default: refuse, naming "
    "its pid).",
)
CACHE_DIR = typer.Option("cache", "--cache-dir", help="Root of the feature cache.")
ROOT = typer.Option(None, "--root", help="Image folder that the split files' paths start from.")
SPLIT_FILES = typer.Option(
    None, "--split-file", help="NAME=PATH of a split file ('relative/path label' lines); repeat for each split."
)
CLASSNAMES = typer.Option(None, "--classnames", help="Class names, one per line (the 'split' dataset only).")
NAME = typer.Option(
    None,
    "--name",
    help="imagefolder and split: the name of this image set's caches and runs (default: the --root folder's name), "
    "so several folders are cached side by side.",
)
DATASET = typer.Option(..., "--dataset", "-d", help="Dataset name (see `vlmcache datasets`).")
ENCODE_MODEL = typer.Option("ViT-B-16", "--model", "-m", help="open_clip model name (open_clip.list_models()).")
ENCODE_PRETRAINED = typer.Option(
    "openai", "--pretrained", "-p", help="open_clip pretrained tag, a local weights file, or 'random' (alias 'none')."
)
PREPROCESS_FROM = typer.Option(
    None,
    "--preprocess-from",
    help="For a local weights file: the pretrained tag it was trained as. The tag sets its "
    "preprocessing (mean, std, resizing) and its activation: QuickGELU for OpenAI's and some other tags.",
)
# which cache a command reads: each may be left out when only one cache matches the rest
CACHE_DATASET = typer.Option(
    None,
    "--dataset",
    "-d",
    help="Dataset of the cache: a name from `vlmcache cache ls`, or the --dataset given to extract (with its --root "
    "or --name for imagefolder, split and wds); default: the only one.",
)
CACHE_MODEL = typer.Option(None, "--model", "-m", help="Model of the cache; default: the only one that matches.")
CACHE_PRETRAINED = typer.Option(
    None, "--pretrained", "-p", help="Weights of the cache (tag, file, random); default: the only one that matches."
)
CACHE_KEY = typer.Option(None, "--cache-key", help="Which cache, when several match the model and weights.")
CACHE_ROOT = typer.Option(
    None,
    "--root",
    help="imagefolder, split and wds: the --root given to extract, which named the cache (unless --name did).",
)
CACHE_NAME = typer.Option(None, "--name", help="imagefolder, split and wds: the --name given to extract.")
CACHE_PREPROCESS = typer.Option(
    "model",
    "--preprocess",
    help="Which cache: model (the weights' own preprocessing) or seed (extract --preprocess seed).",
)


@dataclasses.dataclass(frozen=True)
class CacheRef:
    """Which cache a command reads: each part may be left out when only one cache matches the rest. `dataset` is
    the cache's folder name, as extract named it from --dataset, --root and --name."""

    dataset: str | None
    model: str | None
    pretrained: str | None
    cache_dir: Path
    cache_key: str | None

    def find(self, preprocess: str = "model") -> Path:
        """The cache's `<dataset>/<key>` folder (vlmcache.features.find_cache)."""
        from vlmcache.features import find_cache

        return find_cache(self.cache_dir, self.dataset, self.model, self.pretrained, self.cache_key, preprocess)


_CACHE_OPTIONS = {
    "dataset": (str, CACHE_DATASET),
    "root": (Path, CACHE_ROOT),
    "name": (str, CACHE_NAME),
    "model": (str, CACHE_MODEL),
    "pretrained": (str, CACHE_PRETRAINED),
    "cache_dir": (Path, CACHE_DIR),
    "cache_key": (str, CACHE_KEY),
}


def cache_ref(
    dataset: str | None, root: Path | None, name: str | None, root_is_images: bool = False, **parts
) -> CacheRef:
    """The cache that `extract --dataset D --root R --name N` wrote, named as extract names it (one function,
    vlmcache.extract_config.cache_name): `-d imagefolder --root imgs` finds the cache filed under `imgs`. A cache's
    own folder name (`-d imgs`, as `vlmcache cache ls` shows it) finds it too. `root_is_images`: the command's
    --root is also an image folder (train-head --stream), so it may come with any --dataset."""
    from vlmcache.choices import DATASETS, USER_DATASETS
    from vlmcache.extract_config import cache_name

    naming = {"--name": name} if root_is_images else {"--root": root, "--name": name}
    given = [flag for flag, value in naming.items() if value is not None]
    if given and (dataset is None or dataset not in DATASETS):
        what = f"-d {dataset} is a cache's own folder name" if dataset else "no --dataset was given"
        raise VlmcacheError(
            f"{' and '.join(given)} pick a cache with the --dataset that extract was given (imagefolder, split or "
            f"wds); {what}."
        )
    # without --root or --name, -d is taken as a folder name (as before: `-d split` finds a cache filed as split)
    if (dataset in USER_DATASETS and root is not None) or name is not None:
        dataset = cache_name(dataset, str(root) if root is not None else None, name)
    return CacheRef(dataset=dataset, **parts)


def cache_options(fn):
    """Give a command the options that pick a cache (--dataset, --root, --name, --model, --pretrained, --cache-dir,
    --cache-key), defined here once, and hand them to it as one `cache: CacheRef` argument. A command with a
    `root` parameter of its own keeps it (train-head's --stream reads images from it) and shares it."""
    sig = inspect.signature(fn)
    own = [p for name, p in sig.parameters.items() if name != "cache"]
    options = {k: v for k, v in _CACHE_OPTIONS.items() if k not in sig.parameters}
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        for name, (kind, option) in options.items()
    ]

    @functools.wraps(fn)
    def wrapper(**kw):
        parts = {name: kw.pop(name) if name in options else kw[name] for name in _CACHE_OPTIONS}
        return fn(cache=cache_ref(**parts, root_is_images="root" not in options), **kw)

    wrapper.__signature__ = sig.replace(
        parameters=added + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    )
    wrapper.__annotations__ = {
        **{k: v for k, v in fn.__annotations__.items() if k != "cache"},
        **{name: kind for name, (kind, _) in options.items()},
    }
    del wrapper.__wrapped__  # typer reads the signature above, not fn's
    return wrapper


DEVICE = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
THREADS = typer.Option(
    None,
    "--threads",
    help="torch's CPU threads (default 1: the measured best for heads on a cache, see docs/cli.md; 0: "
    "torch's own default, one per core).",
)
KNN_THREADS = typer.Option(
    None, "--threads", help="torch's CPU threads (default 0: torch's own, one per core; see docs/cli.md)."
)
PRECISION = typer.Option("auto", "--precision", help="auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, fp16, bf16.")
EVAL_SPLIT = typer.Option(None, "--split", help="Split to evaluate on (default: test, else val).")
WORKERS = typer.Option(None, "--workers", help="Image-loading processes (default: min(8, CPUs); 0: in the main one).")
NPROC = typer.Option(1, "--nproc", help="Processes (GPUs) to run with; launches torchrun for you.")
RUNS_DIR = typer.Option("runs", "--runs-dir", help="Where run folders go.")
OUT_RUN = typer.Option(None, "--out", help="This run's folder (default: RUNS_DIR/<name>__<config hash>).")
SEED = typer.Option(0, "--seed", help="Seed: the same seed gives the same result on CPU.")
HOLDOUT = typer.Option(0.2, "--holdout", help="imagefolder without train/ and val/: test fraction per class.")
TAU_NORM = typer.Option(None, "--tau-norm", help="Post-hoc tau-normalisation of a linear classifier.")
LOGIT_ADJUST = typer.Option(None, "--logit-adjust", help="Post-hoc logit adjustment: logits - tau log prior.")
# the training options train-head and finetune share
HEAD_PARAM = typer.Option(None, "--head-param", help="Head setting KEY=VALUE, e.g. depth=2; repeat.")
TEXT_INIT = typer.Option(None, "--text-init", help="Template set that initialises the cosine head.")
LOSS = typer.Option(None, "--loss", help=f"Loss: {', '.join(LOSSES)} (default ce).")
LOSS_PARAM = typer.Option(None, "--loss-param", help="Loss parameter KEY=VALUE, e.g. gamma=1; repeat.")
SAMPLER = typer.Option(None, "--sampler", help=f"Sampler: {', '.join(SAMPLERS)} (default instance).")
SAMPLER_PARAM = typer.Option(
    None, "--sampler-param", help="Sampler setting KEY=VALUE: replacement=false, num_samples=N; repeat."
)
PROTOCOL_HELP = (
    f"{' or '.join(PROTOCOLS)}: default follows the method papers; seed the seed study's code (SGD Nesterov, "
    "warm-up, cos(7 pi t / 16), each method's seed form; train-head also its step budget in epochs of "
    "(iters // epochs) whole batches and selection every 256 steps: docs/seed-protocol.md); lift LIFT's recipe for "
    "--head tail (docs/tail.md). Any option given explicitly wins over the protocol."
)
PROTOCOL = typer.Option("default", "--protocol", help=PROTOCOL_HELP)
LR = typer.Option(None, "--lr", help="Peak learning rate (the protocol's by default).")
WEIGHT_DECAY = typer.Option(None, "--weight-decay", help="Weight decay on matrices (the protocol's by default).")
WARMUP_ITERS = typer.Option(None, "--warmup-iters", help="Linear warm-up steps (seed protocol: 512).")
SCHEDULE = typer.Option(None, "--schedule", help="cosine (to zero) or seed_cosine (cos(7 pi t / 16)).")
HEAD_HELP = f"Head: {', '.join(HEADS)}."
STAGE2_HELP = f"Second stage on the run named by --from: {', '.join(STAGE2)}."


# --------------------------------------------------------------------------- progress


def on_terminal() -> bool:
    """Whether progress is drawn (a bar that redraws itself) or said (a line now and then, for logs and CI)."""
    return err.is_terminal


class _RateColumn(ProgressColumn):
    """Images per second since the split started, as the summary table computes it (images done in this run over
    the time since the split's start), not rich's rate over the last seconds: on a small split that rate left
    out the loader's start and read 40 times the summary's."""

    def render(self, task) -> Text:
        done = task.completed - task.fields.get("resumed", 0)
        elapsed = task.finished_time if task.finished else task.elapsed  # a finished split's rate stays put
        rate = done / elapsed if elapsed and done > 0 else None
        return Text(f"{rate:,.1f} img/s" if rate else "- img/s", style="cyan")


class _Bar:
    """A rich progress bar on stderr (so that --json stays clean), used as a context manager."""

    def __init__(self, *columns, **kw):
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *columns, console=err, **kw
        )
        self.task = None

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()


class RichProgress(_Bar):
    """The extraction's progress: images done of the split's, images/s and ETA."""

    def __init__(self):
        super().__init__(_RateColumn(), TextColumn("ETA"), TimeRemainingColumn())

    def start(self, split: str, total: int, completed: int = 0) -> None:
        self.task = self.bar.add_task(f"extract {split}", total=total, completed=completed, resumed=completed)

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)


class RunProgress(_Bar):
    """A grid's progress: runs done of total, with an ETA; off a terminal, one line per finished run (a bar that
    cannot redraw itself says nothing until the grid ends, minutes later)."""

    def __init__(self):
        super().__init__(TextColumn("runs ETA"), TimeRemainingColumn())
        self.lines = not on_terminal()
        self.done = self.total = 0

    def __enter__(self):
        if not self.lines:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if not self.lines:
            self.bar.stop()

    def start(self, total: int) -> None:
        self.total = total
        self.task = self.bar.add_task("ablate", total=total)

    def advance(self, method: str, status: str = "done") -> None:
        """One run finished: `status` is its results.csv status (done, resumed, failed)."""
        self.done += 1
        self.bar.update(self.task, advance=1, description=f"ablate: {method[:40]:<40}")
        if self.lines:
            task = self.bar.tasks[0]
            eta = f", ETA {task.time_remaining:,.0f} s" if task.time_remaining else ""
            log(f"run {self.done}/{self.total} {status}: {method} ({task.elapsed:,.0f} s{eta})", markup=False)


def epoch_every(total: int, lines: int = 15) -> int:
    """Every how many epochs a line is said off a terminal: the smallest of 1, 2, 5, 10, 20, 50, ... that keeps a
    run of `total` epochs to at most `lines` lines (a 2,000-epoch run: every 200th, 10 lines, and the first)."""
    n = 1
    while total > n * lines:
        n = n * 5 // 2 if str(n)[0] == "2" else n * 2
    return n


class EpochProgress:
    """train-head's epochs: on a terminal, a bar with the last loss and learning rate; elsewhere one line every
    `epoch_every(total)` epochs, the first and the last. A context manager; `on_epoch(row)` is fit's callback."""

    def __init__(self, select_on: str | None = None):
        self.select_on = select_on
        self.bar = None
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def on_epoch(self, row: dict) -> None:
        total = row.get("epochs") or row["epoch"]
        score = f"  {self.select_on} {100 * row['select_score']:.2f}" if "select_score" in row else ""
        if on_terminal():
            if self.bar is None:
                self.bar = Progress(
                    TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs  {task.fields[last]}"),
                    TextColumn("ETA"), TimeRemainingColumn(), console=err,
                )  # fmt: skip
                self.bar.start()
                self.task = self.bar.add_task("train", total=total, last="")
            last = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}{score}"
            self.bar.update(self.task, completed=row["epoch"], last=last)
            return
        every = epoch_every(total)
        if row["epoch"] in (1, total) or row["epoch"] % every == 0:
            log(
                f"epoch {row['epoch']:>{len(str(total))}}/{total}  step {row['step']:>6}  loss {row['loss']:.4f}  "
                f"lr {row['lr']:.2e}{score}  {row['samples_per_s']:>10,.0f} samples/s"
            )


THREADS_MAX = 1024  # --threads: more than any machine has cores; torch crashes (exit 139) on absurd counts


def use_threads(threads: int | None, default: int = 1) -> None:
    """Set torch's intra-op CPU threads for this command: `threads`, else the command's `default` (0: torch's own,
    one per core). Heads on a cache do small matrix products whose threads wait on each other, and collapse when
    other processes hold the cores: docs/cli.md has the measurements behind each command's default."""
    n = default if threads is None else threads
    if not 0 <= n <= THREADS_MAX:
        raise VlmcacheError(f"--threads must be between 0 (torch's default) and {THREADS_MAX}, got {n}.")
    if n:
        import torch

        torch.set_num_threads(n)  # user_errors gives the count back when a command run in-process ends


def launch_torchrun(command: str, nproc: int) -> int:
    """Run this same command under torchrun with `nproc` processes; returns its exit code. A SIGTERM, SIGHUP or
    SIGINT sent to this launcher alone is passed on, so that no rank goes on without it."""
    import signal
    import subprocess

    args, skip = [], False
    for a in sys.argv[2:]:  # drop --nproc N / --nproc=N; torchrun's own variables tell each rank its place
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "vlmcache", command, *args]
    log(f"launching: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd)

    def forward(signum, frame) -> None:  # a kill of the launcher reaches the ranks: torchrun stops its workers
        proc.send_signal(signum)

    before = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # Ctrl-C at a terminal reached torchrun too; a SIGINT to the launcher alone not
                proc.send_signal(signal.SIGINT)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def check_nproc(command: str, nproc: int) -> None:
    """Re-run under torchrun for --nproc N > 1 (once: torchrun sets WORLD_SIZE for its children)."""
    import os

    if nproc < 1:
        raise VlmcacheError(f"--nproc must be at least 1, got {nproc}.")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(launch_torchrun(command, nproc))
