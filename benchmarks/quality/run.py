"""The quality benchmark: fine-tune, measure, merge with every registered method, score, report.

    python benchmarks/quality/run.py                 # both suites, 3 seeds: results/<suite>.{json,md,png}
    python benchmarks/quality/run.py --suite vision  # one suite (text-lora: LoRA fine-tunes; not in "all")
    python benchmarks/quality/run.py --quick         # the CI smoke test: 1 seed, 1 grid point, few examples
    python benchmarks/quality/run.py --report        # rebuild the .md and .png files from the committed JSON
    python benchmarks/quality/run.py --suite text --methods tsv wudi --workdir W  # add or redo some rows only
    python benchmarks/quality/run.py --suite text-lora --seeds 2 --add-seeds      # append a seed to the results

Models, sidecars and merges go to --workdir (default: a temporary directory, removed at the end unless
--keep); fine-tunes and sidecars found there with the same settings are reused. With --methods, the rows
of the named methods (or row labels, as mats[kfac]) are merged, scored and put into the results already in
--out, which must come from the same fine-tunes (a kept --workdir, or the same seeds retrained alike).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    from mergesmith.errors import UsageError
    from mergesmith.quality import DEFAULT_SUITES, SUITES, claim, combine, combine_seeds, run_suite
    from mergesmith.quality.report import summary_table, write

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--quick", action="store_true", help="1 seed, each grid's middle point, few examples")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where results go (default: {RESULTS}; --quick: its quick/ folder)")
    parser.add_argument("--report", action="store_true", help="only rebuild .md and .png from the JSON in --out")
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                        help="only these methods or rows, put into the results already in --out")
    parser.add_argument("--add-seeds", action="store_true",
                        help="run --seeds and append them to the results already in --out (same rows and settings)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 2, or 1 on a busy machine)")
    args = parser.parse_args(argv)
    suites = DEFAULT_SUITES if args.suite == "all" else (args.suite,)
    if args.report:
        everything = [json.loads(((args.out or RESULTS) / f"{suite}.json").read_text()) for suite in suites]
        for results in everything:
            print("\n".join(str(p) for p in write(results, args.out or RESULTS, damage=True)))
        print(summary_table(everything))  # the README's table
        return 0
    if args.methods:  # a misspelt name is refused now, not after the fine-tuning (any suite size)
        from mergesmith.quality import select
        from mergesmith.quality.protocol import variants

        select(list({row.label: row for n in range(2, 9) for row in variants(n, quick=args.quick)}.values()),
               args.methods)
    import torch

    from mergesmith.quality import threads

    torch.set_num_threads(args.threads or threads())
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mergesmith-quality-"))
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    if args.workdir is not None:
        claim(args.workdir, "--workdir")
    command = "python benchmarks/quality/run.py" + "".join(f" {shlex.quote(a)}" for a in _result_options(argv))
    try:
        for suite in suites:
            earlier_file = out / f"{suite}.json"
            earlier = json.loads(earlier_file.read_text()) if (args.methods or args.add_seeds) \
                and earlier_file.is_file() else None
            if args.add_seeds and earlier is None:
                raise UsageError(f"--add-seeds: there are no earlier results in {earlier_file} to add seeds to")
            merge_results = combine_seeds if args.add_seeds else combine

            # after each seed, the results so far, so that a later failure keeps them; rows being added are
            # complete only when every seed is done, so until then they are written on their own
            partial_out = out if earlier is None else out / "partial"
            results = run_suite(suite, work / suite, seeds=seeds, quick=args.quick, command=command,
                                progress=_progress, say=lambda text: print(text, flush=True), only=args.methods,
                                on_seed=lambda partial, where=partial_out: write(partial, where, damage=True))
            for path in write(results if earlier is None else merge_results(earlier, results), out, damage=True):
                print(f"wrote {path}", flush=True)
            if earlier is not None:  # the rows are in the results now; their partial copy was ours
                for path in partial_out.glob(f"{suite}*"):
                    path.unlink()
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.workdir is None:
            print(f"kept the models, sidecars and results in {work}", flush=True)
    return 0


def _result_options(argv: list[str] | None) -> list[str]:
    """The command line without the options that change where files go, not what is measured."""
    given, kept, skip = list(sys.argv[1:] if argv is None else argv), [], False
    for arg in given:
        if skip:
            skip = False
        elif arg in ("--workdir", "--out", "--threads"):
            skip = True
        elif not arg.startswith(("--workdir=", "--out=", "--threads=", "--keep")):
            kept.append(arg)
    return kept


@contextmanager
def _progress(text: str):
    start = time.perf_counter()
    print(f"{text} ...", flush=True)
    yield
    print(f"  {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    from mergesmith.errors import MergeError

    try:
        sys.exit(main())
    except MergeError as error:  # a user's mistake (a foreign --workdir, a bad path or name): one line
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no results written for the suite that was running", file=sys.stderr)
        sys.exit(130)
