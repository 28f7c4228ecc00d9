"""The `mergesmith` command: a thin layer over the library."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mergesmith.errors import MergeError, MergeWarning, UsageError, did_you_mean, human_size

# rich_markup_mode=None: click's plain help, which wraps at any width (rich's cuts option names at 80 columns)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Merge fine-tuned checkpoints of one architecture into one model.")
# Off a terminal (a pipe, a log file) rich would cut table cells at 80 columns: no limit there, so that
# tensor names stay whole for grep
_WIDE = 10_000
console = Console(stderr=True)  # progress, summaries, warnings and errors
if not console.is_terminal:
    console.width = _WIDE
# what a user asked to see (methods, stats inspect, a dry run): stdout, to pipe or grep
listing = Console(soft_wrap=True)
if not listing.is_terminal:
    listing.width = _WIDE


def _reader_left() -> None:
    """`mergesmith methods | head`: the reader has what it wanted, which is success (rich would exit 1)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
    raise SystemExit(0)


listing.on_broken_pipe = _reader_left


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"mergesmith {version('mergesmith')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("mergesmith (not installed)")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (anywhere on the "
                                     "command line).")) -> None:
    """Merge fine-tuned checkpoints of one architecture into one model."""


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
def merge(recipe: Path = typer.Argument(..., metavar="RECIPE", help="YAML recipe (mergekit's format is accepted)."),
          output: Path = typer.Argument(..., metavar="OUTPUT", help="Directory to write the merged model to."),
          device: str = typer.Option("cpu", help="Where the arithmetic runs: cpu, cuda, cuda:1."),
          max_shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB or 200MB."),
          overwrite: bool = typer.Option(False, help="Replace OUTPUT if a previous mergesmith merge wrote it "
                                         "(never a directory mergesmith did not write)."),
          seed: int = typer.Option(0, help="Seed for random methods (DARE): same seed, same model."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan (tensors, "
                                       "methods, bytes, peak memory) without reading a tensor or writing."),
          allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Merge weights that hold NaN or "
                                               "infinite values (an error by default)."),
          quiet: bool = typer.Option(False, help="No progress bar or summary."),
          output_adapter: bool = typer.Option(False, "--output-adapter", help="Write a PEFT LoRA adapter of the "
                                              "merge's difference from the recipe's base_model instead of a full "
                                              "model (needs --rank)."),
          rank: int = typer.Option(None, "--rank", help="The output adapter's rank: each changed matrix's delta "
                                   "is cut to its top RANK singular directions."),
          damage: bool = typer.Option(None, "--damage/--no-damage", help="Predict each model's loss increase from "
                                      "its sidecar (default: while merging, when the recipe names sidecars; with "
                                      "--dry-run, --damage runs the merge without writing to predict it)."),
          verbose: bool = typer.Option(False, "--verbose", help="Also print where the time went: each stage's "
                                       "seconds (reading, merging, writing, and what the merge waited for).")
          ) -> None:
    """Merge the models a RECIPE names into OUTPUT (a Hugging Face model directory, or a PEFT adapter)."""
    from mergesmith.config import load_recipe

    _check_rank(output_adapter, rank)
    load_recipe(recipe)  # the recipe's own errors, before the merge's imports (torch) cost a second
    from mergesmith.api import merge as run_merge

    if dry_run:
        _dry_run(recipe, output, overwrite=overwrite, max_shard_size=max_shard_size,
                 adapter_rank=rank if output_adapter else None, damage=bool(damage), device=device, seed=seed,
                 quiet=quiet)
        return
    _reuse_freed_memory()
    progress = _merge_progress(quiet)
    task = progress.add_task("merge", total=None, name="")
    tuning, on_tune = _tune_progress(quiet)

    def planned(plan) -> None:  # noqa: ANN001 — the bar appears once the plan holds, not over its errors
        tuning.stop()
        progress.update(task, total=len(plan.jobs))
        progress.start()

    try:
        summary = run_merge(recipe, output, device=device, max_shard_size=max_shard_size, overwrite=overwrite,
                            seed=seed, allow_nonfinite=allow_nonfinite, on_plan=planned,
                            on_tensor=lambda job: progress.update(task, advance=1, name=job.name),
                            on_notice=lambda line: _show_warning(line, MergeWarning, "", 0),
                            adapter_rank=rank if output_adapter else None, damage=damage is not False,
                            on_tune=on_tune)
    finally:
        tuning.stop()
        progress.stop()
    if not quiet:
        _print_summary(summary, verbose=verbose)


def _tune_progress(quiet: bool) -> tuple[Progress, Callable[[int, int, str], None]]:
    """A bar for a recipe's tune: block, shown from its first step, and the callback that moves it."""
    bar = Progress(TextColumn("[bold]tuning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[name]}"), console=console, disable=quiet or not console.is_terminal,
                   transient=True)
    task = bar.add_task("tune", total=None, name="")

    def step(done: int, total: int, text: str) -> None:
        bar.start()
        bar.update(task, completed=done, total=total, name=text)

    return bar, step


def _merge_progress(quiet: bool, verb: str = "merging") -> Progress:
    return Progress(TextColumn(f"[bold]{verb}"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
                    TimeElapsedColumn(), TextColumn("{task.fields[name]}"), console=console,
                    disable=quiet or not console.is_terminal, transient=True)  # no bars in a log file


def _check_rank(output_adapter: bool, rank: int | None) -> None:
    if output_adapter and rank is None:
        raise UsageError("--output-adapter needs --rank R, the adapter's rank (e.g. --rank 16)")
    if rank is not None and not output_adapter:
        raise UsageError("--rank is the rank of an output adapter: add --output-adapter, or drop --rank to write a "
                         "full model")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank}: an adapter's rank is at least 1")


def _print_summary(summary, verbose: bool = False) -> None:  # noqa: ANN001 — a MergeSummary
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("method", summary.method)
    table.add_row("models", ", ".join(summary.models))
    table.add_row("tensors", str(summary.tensors))
    held = f"in {len(summary.files)} shard(s)" if summary.adapter is None else "as one adapter"
    table.add_row("read / written", f"{human_size(summary.bytes_read)} / {human_size(summary.bytes_written)} {held}")
    table.add_row("wall time", f"{summary.seconds:.2f} s")
    table.add_row("peak memory", human_size(summary.peak_rss_bytes))
    if summary.fallback:
        shown = ", ".join(summary.fallback[:3]) + (", ..." if len(summary.fallback) > 3 else "")
        table.add_row("without statistics", f"{len(summary.fallback)} tensors took the method's fallback ({shown})")
    if summary.adapter is not None:
        worst = summary.adapter["worst"]
        shown = ", ".join(f"{m} {e:.1e}" for m, _, e in worst[:3])
        table.add_row("adapter", f"rank ≤ {summary.adapter['rank']}, {summary.adapter['modules']} modules; relative "
                      f"error of the delta {summary.adapter['overall_error']:.2e} overall"
                      + (f", worst {shown}" if worst else ""))
    if summary.tuning is not None:
        table.add_row("tuned", summary.tuning.line())
    if summary.layers:
        seconds = [t["seconds"] for t in summary.layers]
        measuring = sum(t["measure_seconds"] for t in summary.layers)
        table.add_row("layer by layer", f"{len(seconds)} layers, {min(seconds):.2f}–{max(seconds):.2f} s each "
                      f"({measuring:.1f} of {sum(seconds):.1f} s measuring Gram matrices on the merged model)")
    if verbose:
        table.add_row("stages", summary.stages.line())
    table.add_row("output", summary.output)
    console.print(table)
    if summary.solver:
        console.print(solver_table(summary.solver))
    if summary.damage:
        console.print(damage_table(summary.damage))


def damage_table(damage: list, worst: int = 3) -> Table:  # a list of ModelDamage
    """Each model's predicted loss increase, its share of the model's forgetting, and its worst layers."""
    table = Table(title="predicted damage: ½ (θ − θ_i)ᵀ F_i (θ − θ_i) from each model's sidecar "
                        "(of forgetting: the same at the base; docs/damage.md)", title_justify="left")
    for column in ("model", "predicted increase", "of forgetting", "worst layers"):
        table.add_column(column, justify="right" if column in ("predicted increase", "of forgetting") else "left")
    for d in damage:
        share = f"{d.normalised:.3f}" if d.normalised is not None else "—"
        layers = ", ".join(f"{name} {value:.2g}" for name, value in d.worst(worst))
        table.add_row(d.model, f"{d.total:.4g} {d.unit}", share, layers)
    return table


@app.command("extract-lora")
def extract_lora(finetune: Path = typer.Argument(..., metavar="FINETUNE", help="The full fine-tune (a Hugging Face "
                                                 "model directory)."),
                 base: Path = typer.Argument(..., metavar="BASE", help="The model it was fine-tuned from."),
                 output: Path = typer.Option(..., "-o", "--output", help="Adapter directory to write."),
                 rank: int = typer.Option(..., "--rank", help="The adapter's rank: each changed matrix's delta is "
                                          "cut to its top RANK singular directions."),
                 dtype: str = typer.Option(None, help="The factors' dtype (default: the base's)."),
                 overwrite: bool = typer.Option(False, help="Replace OUTPUT if mergesmith wrote it."),
                 device: str = typer.Option("cpu", help="Where the arithmetic runs: cpu, cuda, cuda:1."),
                 quiet: bool = typer.Option(False, help="No summary.")) -> None:
    """Write FINETUNE's difference from BASE as a PEFT LoRA adapter of rank RANK (mergekit-extract-lora's job)."""
    from mergesmith.api import extract_lora as run_extract
    from mergesmith.config import DTYPES

    _check_rank(True, rank)
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: not a dtype{did_you_mean(dtype, DTYPES)}")
    summary = run_extract(finetune, base, output, rank=rank, overwrite=overwrite, dtype=dtype, device=device)
    if not quiet:
        _print_summary(summary)


def _dry_run(recipe: Path, output: Path, *, overwrite: bool, max_shard_size: str, adapter_rank: int | None,
             damage: bool = False, device: str = "cpu", seed: int = 0, quiet: bool = False) -> None:
    """Every check of a merge, then its plan on stdout; nothing is read beyond headers, nothing written. With
    ``damage`` the merge is computed (nothing written) to predict each model's damage."""
    from mergesmith.config import load_recipe

    loaded = load_recipe(recipe)  # the recipe's own errors, before the merge's imports (torch)
    from mergesmith.api import check_merge
    from mergesmith.execute import peak_rss_bytes
    from mergesmith.io.writer import OutputTensor, parse_size, shard_layout

    limit = parse_size(max_shard_size)
    plan = check_merge(recipe, output, overwrite=overwrite, adapter_rank=adapter_rank, damage=damage)
    size = plan.size()
    shards = shard_layout([OutputTensor(o.name, o.shape, o.out_dtype) for j in plan.jobs for o in j.outputs], limit)
    method = plan.method.name
    if loaded.merge_method != method:  # a layer-wise method, planned as the weighted average of its fallback
        method = (f"{loaded.merge_method} (layer by layer: each model's calibration data is run through the merged "
                  f"layers at merge time)")
    rows = [("method", method), ("models", ", ".join(s.name for s in plan.sources)),
            ("tensors", f"{size.tensors} (" + ", ".join(f"{n} {m}" for m, n in sorted(size.by_method.items())) + ")")]
    if plan.fallback:
        rows.append(("without statistics", f"{len(plan.fallback)} tensors would take the method's fallback"))
    verb = "replace" if output.exists() and any(output.iterdir()) else "create"
    rows += [("to read", human_size(size.bytes_read)),
             ("to write", f"{human_size(size.bytes_written)} in {len(shards)} shard(s) of at most {max_shard_size}"
                          + (" (a larger tensor gets a shard of its own)" if size.largest_output > limit else "")),
             ("peak memory", f"at most {human_size(size.peak_bound(peak_rss_bytes()))} (the largest job reads "
                             f"{human_size(size.largest_read)}; see the README's Safety section)"),
             ("output", f"would {verb} {output}" + (f" (a PEFT adapter of rank ≤ {adapter_rank})"
                                                     if adapter_rank is not None else ""))]
    done = "nothing is written" if damage else "no tensor was merged and nothing was written"
    listing.print(f"dry run of {recipe}: every check passed; {done}", highlight=False)
    for key, value in rows:
        listing.print(f"  {key + ':':<20}{escape(value)}", highlight=False)
    spec = loaded.tune
    if spec is not None and not damage:
        basis = "their validation data" if spec.data is not None else "the models' predicted damage"
        listing.print(f"  {'tune:':<20}would choose {', '.join(spec.parameters)} on {basis} before merging "
                      f"(--damage runs the tuning and prints the tuned recipe)", highlight=False)
    if damage:
        _dry_run_damage(recipe, loaded, device=device, seed=seed, quiet=quiet)


def _dry_run_damage(recipe: Path, loaded, *, device: str, seed: int, quiet: bool) -> None:  # noqa: ANN001
    from mergesmith.api import predict_damage
    from mergesmith.tune import tune

    if loaded.tune is not None:
        bar, on_tune = _tune_progress(quiet)
        try:
            result = tune(loaded, device=device, seed=seed, on_progress=on_tune)
        finally:
            bar.stop()
        listing.print(f"  {'tuned:':<20}{escape(result.line())}", highlight=False)
        listing.print("  the tuned recipe (the tune: block's values written in):", highlight=False)
        listing.print(escape(result.recipe.to_yaml()), highlight=False)
        recipe = result.recipe
        if not any(m.stats for m in result.recipe.models):
            listing.print(f"  {'damage:':<20}no model has a sidecar: nothing to predict", highlight=False)
            return
    progress = _merge_progress(quiet, "predicting")
    task = progress.add_task("damage", total=None, name="")

    def planned(plan) -> None:  # noqa: ANN001
        progress.update(task, total=len(plan.jobs))
        progress.start()

    try:
        summary = predict_damage(recipe, device=device, seed=seed, on_plan=planned,
                                 on_tensor=lambda job: progress.update(task, advance=1, name=job.name))
    finally:
        progress.stop()
    listing.print(f"  {'damage:':<20}the merge computed in {summary.seconds:.1f} s (nothing written) predicts",
                  highlight=False)
    listing.print(damage_table(summary.damage))


def solver_table(reports: dict[str, dict], shown: int = 40) -> Table:
    """Conjugate gradient per block: iterations and relative residuals, worst final residual first."""
    worst = sorted(reports.items(), key=lambda item: -item[1]["final_residual"])
    title = (f"conjugate gradient: {len(reports)} blocks, {sum(r['iterations'] for r in reports.values())} "
             f"iterations, worst final residual {worst[0][1]['final_residual']:.1e}")
    table = Table(title=title if len(worst) <= shown else f"{title} ({shown} worst shown)", title_justify="left")
    for column in ("block", "iterations", "initial residual", "final residual"):
        table.add_column(column, justify="left" if column == "block" else "right")
    for name, report in worst[:shown]:
        table.add_row(name, str(report["iterations"]), f"{report['initial_residual']:.2e}",
                      f"{report['final_residual']:.2e}")
    return table


@app.command()
def methods(name: str = typer.Argument(None, metavar="[METHOD]", help="One method to describe (default: all).")
            ) -> None:
    """List the merge methods with each parameter's default, range and meaning."""
    from mergesmith.methods import get_method, method_names

    for method in [name.lower()] if name else method_names():
        spec = get_method(method)
        summary = spec.summary.replace("``", "")  # the docstrings' code markup reads as noise in a terminal
        listing.print(f"[bold]{spec.name}[/bold]  {escape(summary)}", highlight=False)
        base = {"required": "needs a base_model", "optional": "base_model optional", "ignored": "no base_model"}
        listing.print(f"    {base[spec.base]}" + (f"; {spec.reference}" if spec.reference else ""), highlight=False)
        for p in spec.params:
            scope = "per model" if p.per_model else "global"
            listing.print(f"    {p.name} ({scope}): default {_shown(p.default)}, {p.range_text}", highlight=False)
            if p.help:
                listing.print(f"        {escape(p.help)}", highlight=False)


def _shown(value: object) -> str:
    from mergesmith.methods.registry import REQUIRED

    return "(required)" if value is REQUIRED else str(value).lower() if isinstance(value, bool) else str(value)


@app.command()
def demo(suite: str = typer.Option("vision", help="vision (a small ConvNext on scikit-learn's digits, about a "
                                   "minute) or text (MiniLM-L6 on Debian's dictionaries and Bible; "
                                   "slower)."),
         out: Path = typer.Option(Path("mergesmith-demo"), help="Where the table (JSON, Markdown) and charts go."),
         workdir: Path = typer.Option(None, help="Keep the models and sidecars here (reused by the next run) "
                                      "instead of a temporary directory."),
         keep: bool = typer.Option(False, help="Keep the temporary directory of models and sidecars."),
         quick: bool = typer.Option(False, help="Three tasks, one grid point per method, fewer steps: a smoke "
                                    "test.")) -> None:
    """Fine-tune a small real model on several tasks, merge the fine-tunes with every method, compare."""
    from mergesmith.demo import run_demo
    from mergesmith.quality import SUITES

    if suite not in SUITES:
        raise UsageError(f"--suite {suite}: expected {' or '.join(SUITES)}{did_you_mean(suite, SUITES)}")
    run_demo(suite=suite, workdir=workdir, out=out, keep=keep, quick=quick, console=console)


@app.command()
def measure(model: Path = typer.Argument(..., metavar="MODEL", help="Local Hugging Face model directory, a PEFT "
                                         "LoRA adapter directory, or BASE+ADAPTER."),
            base: Path = typer.Option(None, "--base", help="An adapter's base model (default: the adapter's "
                                      "base_model_name_or_path)."),
            data: Path = typer.Option(..., "--data", help="JSONL, CSV, text (one example per line), parquet, "
                                      "or a saved `datasets` directory; for image-cls each row's pixel_values "
                                      "field holds the image as [channels][height][width] numbers."),
            output: Path = typer.Option(..., "-o", "--output", "--out", help="Sidecar directory to write."),
            overwrite: bool = typer.Option(False, help="Replace the sidecar OUTPUT already holds (its statistics "
                                           "files only)."),
            kind: list[str] = typer.Option(["fisher"], metavar="KIND",
                                           help="fisher, gram or kfac; repeat for several."),
            task: str = typer.Option(None, help="causal-lm, seq-cls or image-cls (default: from config.json's "
                                     "architecture); image-cls reads pixel_values, already resized and normalised "
                                     "as the model takes them, and needs no tokenizer."),
            text_field: str = typer.Option("text", help="The field holding each example's text (JSONL, CSV, "
                                           "parquet, datasets)."),
            label_field: str = typer.Option(None, help="The field holding each example's class index (seq-cls, "
                                            "image-cls)."),
            max_length: int = typer.Option(512, help="Longest sequence in tokens; never past the model's own "
                                           "maximum (longer examples are truncated, with a warning)."),
            batch_size: int = typer.Option(8, help="Examples per forward and backward pass."),
            max_examples: int = typer.Option(None, help="Measure on this many examples, drawn with --seed "
                                             "(default: all)."),
            seed: int = typer.Option(0, help="Seed for --max-examples and for the labels of --fisher sampled."),
            device: str = typer.Option("cpu", help="Where the model runs: cpu, cuda, cuda:1."),
            fisher: str = typer.Option("empirical", help="empirical (data labels), sampled (labels drawn from "
                                       "the model) or exact (classifiers: seq-cls, image-cls)."),
            samples: int = typer.Option(1, help="Label draws per example for --fisher sampled, each weighted 1/k."),
            exclude: list[str] = typer.Option(None, "--exclude", help="Measure nothing for modules whose name "
                                              "matches this regex (re.search): no Gram, K-FAC or Fisher; recorded "
                                              "in the sidecar. Repeat for several."),
            max_factor_size: str = typer.Option("1x", help="Largest Gram or K-FAC factor, e.g. 1GB, or a multiple "
                                                "of the model's float32 size (1x); a larger one is skipped with a "
                                                "warning and recorded in the sidecar. 'none': no limit."),
            max_shard_size: str = typer.Option("5GB", help="Largest sidecar file, e.g. 5GB or 200MB; above it "
                                               "the sidecar is sharded."),
            trust_remote_code: bool = typer.Option(False, help="Run code shipped with the model (off).")) -> None:
    """Measure curvature statistics of MODEL on DATA into a sidecar (docs/statistics.md)."""
    from mergesmith.io.sidecar import check_writable
    from mergesmith.io.writer import parse_size
    from mergesmith.measure.checkpoint import measure_checkpoint

    shard_limit = parse_size(max_shard_size)
    check_writable(output, overwrite)  # before the work, not after it
    progress = Progress(TextColumn("[bold]measuring"), BarColumn(), MofNCompleteColumn(), TextColumn("examples"),
                        TimeElapsedColumn(), console=console, transient=True,
                        disable="RANK" in os.environ and os.environ["RANK"] != "0" or not console.is_terminal)
    counter = progress.add_task("measure", total=None)

    def advance(done: int, total: int) -> None:
        progress.update(counter, completed=done, total=total)
        progress.start()  # once the checks have passed and the model is loaded: no bar over an error

    try:
        run = measure_checkpoint(
            model, data, kinds=[k.strip() for given in kind for k in given.split(",") if k.strip()],  # fisher,gram
            task=task, text_field=text_field, label_field=label_field, max_length=max_length, batch_size=batch_size,
            max_examples=max_examples, seed=seed, device=device, fisher=fisher, samples=samples,
            exclude=exclude or [], max_factor_size=max_factor_size, trust_remote_code=trust_remote_code,
            progress=advance, base=base)
    finally:
        progress.stop()
    stats = run.statistics
    if run.rank == 0:
        path = stats.save(output, max_shard_size=shard_limit)
        skipped = ""
        if stats.skipped:
            names = ", ".join(sorted(stats.skipped)[:3]) + (", ..." if len(stats.skipped) > 3 else "")
            skipped = f"; {len(stats.skipped)} module(s) skipped ({names}), recorded in the sidecar"
        console.print(f"{run.examples} examples, {len(stats.tensors)} statistics ({', '.join(run.kinds)}) → {path}"
                      f"{skipped}", soft_wrap=True)
    if run.world > 1:
        import torch.distributed

        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


stats_app = typer.Typer(no_args_is_help=True, help="Inspect and combine statistics sidecars.")
app.add_typer(stats_app, name="stats")


@stats_app.command("combine")
def stats_combine(sources: list[Path] = typer.Argument(..., metavar="SIDECAR",
                                                      help="Sidecars of one model, measured on disjoint data."),
                  output: Path = typer.Option(..., "-o", "--output", help="Sidecar directory to write."),
                  overwrite: bool = typer.Option(False, help="Replace the sidecar OUTPUT already holds."),
                  max_shard_size: str = typer.Option("5GB", help="Largest sidecar file, e.g. 5GB or 200MB; above "
                                                     "it the sidecar is sharded.")) -> None:
    """Combine sidecars exactly: count-weighted means. Inputs may be sharded; one input alone reshards it."""
    from mergesmith.io.sidecar import check_writable, combine_stats
    from mergesmith.io.writer import parse_size

    limit = parse_size(max_shard_size)
    check_writable(output, overwrite, inputs=tuple(sources))
    console.print(f"wrote {combine_stats(list(sources), output, max_shard_size=limit)}")


@stats_app.command("inspect")
def stats_inspect(source: Path = typer.Argument(..., metavar="SIDECAR", help="A sidecar directory.")) -> None:
    """Print what a sidecar holds."""
    from mergesmith.io.sidecar import StatsReader

    reader = StatsReader(source)
    shards = f", {len(reader.files)} shards" if len(reader.files) > 1 else ""
    table = Table(title=f"{reader.path} — model {reader.model}, fisher {reader.fisher_variant or '-'}{shards}")
    for column in ("statistic", "shape", "count", "mean"):
        table.add_column(column)
    for key in sorted(reader.keys()):
        tensor = reader.get(key)
        table.add_row(key, str(tuple(tensor.shape)), str(reader.counts[key]), f"{tensor.mean().item():.3e}")
    listing.print(table)
    from mergesmith.statistics import Sidecar

    for module, entry in sorted(Sidecar(str(source), reader).skipped.items()):
        listing.print(f"skipped at measure time: {module} ({', '.join(entry['kinds'])}): {entry['reason']}",
                      highlight=False)


class Terminated(BaseException):
    """Ctrl-C, SIGTERM or SIGHUP, raised in the main thread so that every ``finally`` and temporary
    directory cleanup runs. A BaseException, so that no ``except Exception`` swallows it, and not a
    KeyboardInterrupt, which typer would turn into a silent exit."""

    def __init__(self, signal_number: int):
        super().__init__(signal_number)
        self.signal_number = signal_number


def _raise_terminated(signal_number: int, _frame: object) -> None:
    raise Terminated(signal_number)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Every warning is one ``warning:`` line on stderr (ours say what to do; others keep their source)."""
    where = "" if issubclass(category, MergeWarning) else f" ({Path(filename).name}:{lineno})"
    console.print(f"[yellow]warning:[/yellow] {escape(str(message))}{where}", highlight=False, soft_wrap=True)


def _click_exceptions() -> tuple[type, ...]:
    """click's exception module, and typer's vendored copy of click where this typer has one."""
    import importlib

    found = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    return tuple(found)


def _error_line(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point and error contract: a user error (MergeError, a usage error) is one line on stderr and
    exit 2; Ctrl-C exits 130, SIGTERM 143 (SIGHUP 129) after the unfinished output is removed; any other
    exception is a bug in mergesmith: one line and exit 1. ``--debug`` (anywhere) shows the traceback."""
    import signal
    import warnings

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {number: signal.signal(number, _raise_terminated) for number in handled}
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        _run(args, debug)
    finally:  # for callers that go on (tests, a Python session): their handlers back
        for number, handler in previous.items():
            signal.signal(number, handler)
        warnings.showwarning = shown


def _run(args: list[str], debug: bool) -> None:
    import signal
    import traceback

    modules = _click_exceptions()

    def of(name: str) -> tuple[type, ...]:
        return tuple(getattr(m, name) for m in modules if hasattr(m, name))

    try:
        code = app(args=args, prog_name="mergesmith", standalone_mode=False)
    except MergeError as e:
        if debug:
            traceback.print_exc()
        _error_line(str(e))
        sys.exit(2)
    except (KeyboardInterrupt, Terminated, *of("Abort")) as e:
        cause = e.__cause__ if isinstance(e, of("Abort")) else e
        number = cause.signal_number if isinstance(cause, Terminated) else signal.SIGINT
        _interrupted(number)
    except of("NoArgsIsHelpError") as e:  # bare `mergesmith` or `mergesmith stats`: the help, on stdout
        typer.echo(e.ctx.get_help())
        sys.exit(0)
    except of("ClickException") as e:  # a misspelt option, a missing argument, a bad value
        if debug:
            traceback.print_exc()
        context = getattr(e, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context is not None else ""
        _error_line(" ".join(e.format_message().split()) + hint)
        sys.exit(2 if e.exit_code in (1, 2) else e.exit_code)
    except BrokenPipeError:  # a listing printed by typer or click rather than rich
        _reader_left()
    except MemoryError as e:  # the machine's limit: neither the user's input nor a bug
        if debug:
            raise
        _error_line(f"out of memory{f' ({e})' if str(e) else ''}; free memory, or see what the merge needs with "
                    f"--dry-run (the README's Safety section states the bound)")
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 — a bug: say so in one line, never as the user's mistake
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        _error_line(f"internal error ({type(e).__name__}: {first}); this is a bug in mergesmith — rerun with "
                    f"--debug for the traceback and please report it")
        sys.exit(1)
    if code == 128 + signal.SIGINT:  # typer's own answer to a KeyboardInterrupt it caught
        _interrupted(signal.SIGINT)
    sys.exit(code or 0)


def _interrupted(number: int) -> None:
    import signal

    name = "Ctrl-C" if number == signal.SIGINT else signal.Signals(number).name
    _error_line(f"interrupted ({name}); nothing half-written was left (an unfinished output is removed)")
    sys.exit(128 + number)


if __name__ == "__main__":
    main()
