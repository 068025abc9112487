"""`vlmcache bench` and `vlmcache demo`: the measured figures, and the whole loop on built-in data."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcache.cli.common import (
    CACHE_DIR,
    DEVICE,
    JSON,
    WORKERS,
    RichProgress,
    RunProgress,
    app,
    err,
    log,
    out,
    print_json,
    user_errors,
)


@app.command(rich_help_panel="Start here, and benchmarks")
@user_errors
def bench(
    scale: str = typer.Option("default", "--scale", help="smoke (seconds), default (minutes on a CPU), full."),
    markdown: Path = typer.Option("BENCHMARKS.md", "--markdown", help="The Markdown file the figures go to."),
    device: str = DEVICE,
    only: list[str] = typer.Option(
        None,
        "--only",
        help="Run these sections alone and replace them in the Markdown file, keeping the rest (repeat it): "
        "extraction, pipeline, loop, grouped, memory, cache_size, streaming, finetune, prompts, tail.",
    ),
    as_json: bool = JSON,
):
    """Speed, memory and cache size, each figure as a ratio to its limit measured in the same run.

    Example: [bold]vlmcache bench --scale default --markdown BENCHMARKS.md[/]
    (one section: [bold]vlmcache bench --only grouped[/])
    """
    from vlmcache import guard
    from vlmcache.bench import run_bench, to_markdown

    guard.check_output(markdown, "--markdown", "markdown", overwrite=True)  # only a file bench wrote is replaced
    results = run_bench(scale, device, log=log, only=only)
    existing = Path(markdown).read_text() if Path(markdown).is_file() else None
    text = to_markdown(results, existing)
    Path(markdown).write_text(text)
    if as_json:
        print_json({**results, "markdown": str(markdown)})
        return
    out.print(text, markup=False, highlight=False)
    out.print(f"written: {markdown}", highlight=False)


@app.command(rich_help_panel="Start here, and benchmarks")
@user_errors
def demo(
    cache_dir: Path = CACHE_DIR,
    runs_dir: Path = typer.Option("runs/demo", "--runs-dir", help="Where the demo's run folders and report go."),
    workers: int = WORKERS,
    as_json: bool = JSON,
):
    """Run the whole loop on the built-in digits_lt data with the tiny random-weight model: extract, zero-shot,
    the demo pipeline (every loss on a linear head, a decoder, a cRT stage) and its report.

    Example: [bold]vlmcache demo[/]
    """
    from vlmcache import demo as demo_loop
    from vlmcache.choices import default_workers
    from vlmcache.cli.extract import print_extract_summary

    demo_loop.check_outputs(str(cache_dir), str(runs_dir))
    err.print(
        "[bold]vlmcache demo[/]: digits_lt (scikit-learn digits, long-tailed) with vlmcache-tiny.\n"
        "vlmcache-tiny has [bold]random weights[/]: its numbers show that the pipeline runs, not CLIP's accuracy.",
        markup=True,
    )
    with demo_loop.one_thread():
        with RichProgress() as progress:
            workers = default_workers() if workers is None else workers
            extracted = demo_loop.extract(str(cache_dir), workers, progress, log)
        with RunProgress() as progress:
            result = demo_loop.evaluate(str(cache_dir), str(runs_dir), progress, log)
    if as_json:
        print_json({"cache": extracted["cache"], **{k: v for k, v in result.items() if k != "table"}})
        return
    print_extract_summary(extracted)
    zs = result["zero_shot"]
    out.print(f"zero-shot (openai templates): overall {100 * zs['overall']:.1f}, few {100 * zs['few']:.1f}")
    out.print(result["table"], markup=False, highlight=False, soft_wrap=True)
    out.print(
        f"report: {result['report']}  (runs in {runs_dir}; re-evaluate one with `vlmcache eval RUN`)", highlight=False
    )
