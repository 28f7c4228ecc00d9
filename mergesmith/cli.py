"""The `mergesmith` command: a thin layer over the library."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mergesmith.errors import MergeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge fine-tuned checkpoints of one architecture into one model.")
console = Console(stderr=True)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _reuse_freed_memory() -> None:
    """Ask glibc to keep freed blocks up to 32 MB in the heap instead of unmapping them: otherwise every
    tensor-sized allocation of a streaming merge faults in fresh zeroed pages (about a fifth of a linear
    merge's time here). A no-op where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


@app.command()
def merge(recipe: Path = typer.Argument(..., help="YAML recipe (mergekit's format is accepted)."),
          output: Path = typer.Argument(..., help="Directory to write the merged model to."),
          device: str = typer.Option("cpu", help="Where the arithmetic runs: cpu, cuda, cuda:1."),
          max_shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB or 200MB."),
          overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
          seed: int = typer.Option(0, help="Seed for random methods (DARE): same seed, same model."),
          quiet: bool = typer.Option(False, help="No progress bar or summary.")) -> None:
    """Merge the models a RECIPE names into OUTPUT_DIR (a Hugging Face model directory)."""
    from mergesmith.merge import merge as run_merge

    _reuse_freed_memory()
    progress = Progress(TextColumn("[bold]merging"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
                        TimeElapsedColumn(), TextColumn("{task.fields[name]}"), console=console,
                        disable=quiet, transient=True)
    with progress:
        task = progress.add_task("merge", total=None, name="")
        summary = run_merge(recipe, output, device=device, max_shard_size=max_shard_size, overwrite=overwrite,
                            seed=seed,
                            on_plan=lambda plan: progress.update(task, total=len(plan.jobs)),
                            on_tensor=lambda job: progress.update(task, advance=1, name=job.name))
    if quiet:
        return
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("method", summary.method)
    table.add_row("models", ", ".join(summary.models))
    table.add_row("tensors", str(summary.tensors))
    table.add_row("read / written", f"{_gb(summary.bytes_read)} / {_gb(summary.bytes_written)} "
                  f"in {len(summary.files)} shard(s)")
    table.add_row("wall time", f"{summary.seconds:.2f} s")
    table.add_row("peak memory", _gb(summary.peak_rss_bytes))
    table.add_row("output", summary.output)
    console.print(table)


@app.command()
def methods() -> None:
    """List the merge methods and their parameters."""
    from mergesmith.methods import get_method, method_names

    for name in method_names():
        spec = get_method(name)
        params = ", ".join(f"{p.name}{'*' if p.per_model else ''}" for p in spec.params)
        console.print(f"[bold]{name}[/bold]  {spec.summary}\n    parameters: {params}  (* per model)")


@app.command()
def demo(workdir: Path = typer.Option(None, help="Where to keep the demo's models (default: a temp dir)."),
         steps: int = typer.Option(60, help="Fine-tuning steps per task.")) -> None:
    """Fine-tune a small real model on three tasks, merge the fine-tunes with several methods, compare."""
    from mergesmith.demo import run_demo

    run_demo(workdir=workdir, steps=steps, console=console)


def main() -> None:
    """Entry point: a MergeError is one line on stderr and exit status 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except MergeError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; nothing was written to the output path")
        sys.exit(130)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
