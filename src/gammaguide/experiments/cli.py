"""Subcommands of the experiments: train, ablate, report.

Only argument definitions live at import time; torchvision, tqdm and matplotlib are imported
when a command runs, so ``gammaguide inspect`` stays light. The options every task takes are
declared here, each task's own in its class (``Task.options``); ``train`` and ``ablate`` are the
same for every task: the task comes from ``--data`` (``tasks.for_spec``).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields, replace
from pathlib import Path

from ..errors import GammaGuideError
from ..policy import resolve_policy
from .tasks import TASKS, for_config, for_spec

_TRAIN_EXAMPLES = """\
examples:
  gammaguide train --data imagefolder:../shared/data/cifar10-jpeg --subset 5000 --epochs 5 --out runs/demo
  GAMMAGUIDE_DATA=../shared/data/cifar10-jpeg gammaguide train --data imagefolder --policy all --out runs/demo
  torchrun --nproc_per_node=2 -m gammaguide train --data imagefolder --sync-bn --out runs/ddp
  gammaguide train --data multi30k:../shared/data/multi30k-de-en --model seq2seq_preln --epochs 2 --out runs/mt
"""

_ABLATE_EXAMPLES = """\
examples:
  gammaguide ablate --protocol smoke --data imagefolder:../shared/data/cifar10-jpeg --out runs/smoke
  gammaguide ablate --protocol cpu --data imagefolder --out results/cifar10-resnet20-cpu
  gammaguide ablate --protocol gpu --data imagefolder --jobs 16 --epochs auto --time-budget 480 --out runs/gpu
  gammaguide ablate --protocol cpu --data imagefolder --shard 0/4 --out runs/grid   # one of 4 machines
  gammaguide ablate --protocol sst2-cpu --model textcls_postln --data sst2:../shared/data/sst2 --out runs/sst2
  gammaguide ablate --protocol gpu --data imagefolder --fuse 40 --epochs 30 --out runs/gpu  # 40 runs as one network
"""


_REPORT_EXAMPLES = """\
examples:
  gammaguide report runs/grid/results.jsonl --out runs/grid
  gammaguide report runs/a/results.jsonl runs/b/results.jsonl --out runs/both     # a column per setting
  gammaguide report results/*/results.jsonl --claims                              # the claims table only
"""


def _data_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--data", required=required, metavar="SPEC",
                   help="cifar10, cifar100 (torchvision; downloaded when online), or imagefolder:PATH (a folder "
                        "with train/ and test/ class folders; PATH may be left out when $GAMMAGUIDE_DATA points "
                        "to it); text: sst2:PATH (GLUE SST-2 TSVs) or multi30k:PATH (Multi30k De-En)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where cifar10/cifar100 live, or the base of a relative imagefolder PATH "
                        "(default: $GAMMAGUIDE_DATA)")


def _run_options(p: argparse.ArgumentParser) -> None:
    """Options of train and ablate; None means: the protocol's value (ablate) or the config's (train)."""
    p.add_argument("--model", help="a built-in model (default resnet20; ablate: protocol's)")
    p.add_argument("--epochs", metavar="E", help="epochs (ablate: an integer, or 'auto' with --time-budget)")
    p.add_argument("--subset", type=int, metavar="N", help="a fixed, class-balanced subset of N training images")
    p.add_argument("--test-subset", type=int, metavar="N", help="a fixed, class-balanced subset of N test images")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.1)")
    p.add_argument("--weight-decay", type=float, help="L2 strength for what the policy decays")
    p.add_argument("--schedule", choices=("cosine", "onecycle", "linear"),
                   help="cosine, onecycle (images); linear or cosine after a warm-up (text)")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up (cosine schedule)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of each run, recorded in the key so that --jobs cannot change a run's numbers "
                        "(default: the cores shared by the runs at once, not in the key)")
    p.add_argument("--out", required=True, metavar="DIR", help="results go to DIR/results.jsonl")
    seen: set[str] = set()
    for task in TASKS:
        group = p.add_argument_group(f"{task.label} tasks ({task.about})")
        for o in task.options:
            if o.flag in seen:
                continue
            seen.add(o.flag)
            if o.store_true:
                group.add_argument(o.flag, dest=o.field, action="store_true", default=None, help=o.help)
            else:
                group.add_argument(o.flag, dest=o.field, type=o.type, choices=o.choices, default=None, help=o.help)


def register(sub) -> None:
    """Add this package's subcommands to the ``gammaguide`` parser."""
    p = sub.add_parser("train", help="train one model with one policy; appends a line to OUT/results.jsonl",
                       description="Train a built-in model on a dataset with the parameter groups of one policy, "
                                   "and append the run (settings, per-epoch history, mechanisms) to "
                                   "OUT/results.jsonl.",
                       epilog=_TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_options(p, required=True)
    p.add_argument("--policy", default="guidelines", help="guidelines, all, no_norm, no_gamma or only:<role>")
    p.add_argument("--seed", type=int, default=0, help="fixes the initial weights and the batches (default 0)")
    _run_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    p = sub.add_parser("ablate", help="train a grid of arms x seeds (the paper's ablation), resumably",
                       description="Run every arm (policy) with every seed into OUT/results.jsonl. A rerun skips "
                                   "finished runs; --shard i/n splits the grid between machines.",
                       epilog=_ABLATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default="smoke",
                   help="the defaults of the grid: " + "; ".join(f"{t.label}: {', '.join(t.protocols)}" for t in TASKS)
                   + " (default: the data's first)")
    _data_options(p, required=True)
    p.add_argument("--arms", help="comma-separated policies (default: the 8 arms of the ablation)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the protocol's)")
    p.add_argument("--shard", metavar="i/n", help="run only every n-th run of the grid, starting at the i-th")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in worker processes (default 1)")
    p.add_argument("--fuse", default="auto", metavar="N",
                   help="train runs that differ only in policy and seed in groups of up to N as one network "
                        "(1: each alone; auto, the default: as many as GPU memory holds on CUDA, 1 on the CPU); "
                        "with --jobs, groups run in parallel processes")
    p.add_argument("--compile", action="store_true", help="torch.compile each fused group (prints compile time)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="with --epochs auto: the grid's wall time")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again instead of skipping them")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="per-epoch checkpoints of runs in flight "
                   "(default OUT/checkpoints; each is deleted when its run is finished)")
    p.add_argument("--no-report", action="store_true", help="do not write OUT/report.md when the grid is complete")
    _run_options(p)
    p.set_defaults(func=run_ablate)

    p = sub.add_parser("report", help="claims table, markdown report and plots from results files",
                       description="Summarise one or more results files. For every setting (runs equal in all but "
                                   "arm and seed): per arm, mean ± sd of the metric, failures, and the paired "
                                   "difference to no_gamma and all with its 95% t interval; a claims table with "
                                   "a verdict per claim of the paper and setting; plots of accuracy, |γ| per role, "
                                   "effective learning rate and residual variance ratios. Several files (several "
                                   "settings, or shards of one) make one report with a column per setting.",
                       epilog=_REPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", metavar="RESULTS.jsonl")
    p.add_argument("--out", metavar="DIR", help="writes DIR/report.md and DIR/*.png (with --claims: DIR/claims.md)")
    p.add_argument("--claims", action="store_true",
                   help="print only the claims table over every setting of the files (markdown, on stdout)")
    p.add_argument("--title", help="the report's heading")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run_report)


# ----------------------------------------------------------------------------- config from arguments


def _int_epochs(text: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise GammaGuideError(f"bad --epochs {text!r}: give a positive integer" +
                              (" (or 'auto' with --time-budget, for ablate)" if text == "auto" else ""))
    return value


def _config_from(args, base, task):
    """``base`` (the task's config) with every option the user gave; another task's option is an error."""
    own = {o.flag for o in task.options}
    given = [(t, o) for t in TASKS if t is not task for o in t.options
             if o.flag not in own and getattr(args, o.field, None) is not None]
    for _, o in given:
        if o.refusal:
            raise GammaGuideError(o.refusal)
    if given:
        flags = list(dict.fromkeys(o.flag for _, o in given))
        raise GammaGuideError(f"{', '.join(flags)} apply to {given[0][0].about}; leave "
                              f"{'them' if len(flags) > 1 else 'it'} out for {task.a_model}")
    changes = {}
    for f in fields(base):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("epochs", "policy", "seed"):
            changes[f.name] = value
    return task.adjust(replace(base, **changes), args)


def parse_arms(text: str) -> tuple[str, ...]:
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    for a in arms:
        resolve_policy(a)
    if len(set(arms)) != len(arms):
        raise GammaGuideError(f"--arms lists an arm twice: {text}")
    return arms


def parse_seeds(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if not text:
        return default
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds):
        raise GammaGuideError(f"bad --seeds {text!r}: give non-negative integers separated by commas, e.g. 0,1,2")
    return seeds


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if n < 1 or not 0 <= i < n:
        raise GammaGuideError(f"bad --shard {text!r}: write i/n with 0 <= i < n, e.g. 0/4 for the first of 4")
    return i, n


def _writable_dir(text: str, flag: str = "--out") -> Path:
    """A folder the command can write into, checked before any work (a finished run that cannot
    be saved is a lost run): it exists and is writable, or the nearest folder above it is."""
    path = Path(text).expanduser()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise GammaGuideError(f"{flag} {text!r}: {existing} is a file, not a folder; give a folder (it is created "
                              f"if missing), e.g. {flag} runs/demo")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GammaGuideError(f"{flag} {text!r}: the folder {existing} is not writable; give a folder you can write "
                              f"into, e.g. {flag} runs/demo")
    return path


def _listed(text: str | None, flag: str, example: str) -> None:
    """``--arms`` / ``--seeds`` given but naming nothing is a mistake, not a request for the defaults."""
    if text is not None and not text.replace(",", "").strip():
        raise GammaGuideError(f"{flag} {text!r} names nothing; give comma-separated values, e.g. {flag} {example}, "
                              f"or leave {flag} out for the protocol's")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_train(args) -> int:
    from .distributed import init_distributed, load_once, shutdown
    from .results import RESULTS_NAME
    from .trainer import Trainer, score

    task = for_spec(args.data)
    base = task.default_config(args.data)
    cfg = _config_from(args, base, task)
    epochs = base.epochs if args.epochs is None else _int_epochs(args.epochs)
    cfg = replace(cfg, epochs=epochs, policy=args.policy, seed=args.seed)
    cfg.check()
    _writable_dir(args.out)
    ctx = init_distributed(args.device)
    try:
        data = load_once(ctx, task, cfg, args.data_dir, progress=not args.no_progress)
        results = Path(args.out) / RESULTS_NAME
        trainer = Trainer(cfg, data, ctx, checkpoint=Path(args.out) / "checkpoints" / f"{cfg.key()}.pt",
                          progress=not args.no_progress, log=_log)
        record = trainer.run()
        trainer.save_result(record, results)
        if ctx.is_main:
            _log(f"{score(record)}; appended to {results}" if record.status == "ok"
                 else f"run failed: {record.reason}; recorded in {results}")
        return 0 if record.status == "ok" else 1
    finally:
        shutdown(ctx)


def run_ablate(args) -> int:
    from . import grid
    from .distributed import init_distributed, shutdown
    from .protocols import PROTOCOLS

    if args.protocol not in PROTOCOLS:
        raise GammaGuideError(f"unknown --protocol {args.protocol!r}; use {', '.join(PROTOCOLS)}")
    task, protocol = for_spec(args.data), PROTOCOLS[args.protocol]
    if for_config(protocol.config) is not task:
        if args.protocol != "smoke":
            raise GammaGuideError(f"--protocol {args.protocol} is for {for_config(protocol.config).label} data, not "
                                  f"{args.data}; use --protocol {' or '.join(task.protocols)}")
        protocol = PROTOCOLS[task.protocols[0]]  # the default protocol, for this task
    _listed(args.arms, "--arms", "guidelines,no_gamma")
    _listed(args.seeds, "--seeds", "0,1,2")
    seeds = parse_seeds(args.seeds, protocol.seeds)
    shard = parse_shard(args.shard)
    if args.jobs < 1:
        raise GammaGuideError(f"--jobs must be at least 1, got {args.jobs}")
    base = _config_from(args, protocol.config, task)
    auto = args.epochs == "auto"
    if auto and not args.time_budget:
        raise GammaGuideError("--epochs auto needs --time-budget SECONDS (the wall time the grid may take)")
    if args.epochs is not None and not auto:
        base = replace(base, epochs=_int_epochs(args.epochs))
    base.check()
    _check_data(args.data, args.data_dir)  # a missing tree is one line, before any header or work
    arms = parse_arms(args.arms) if args.arms else (protocol.arms or task.default_arms(base, _log))
    _writable_dir(args.out)
    if args.checkpoint_dir:
        _writable_dir(args.checkpoint_dir, "--checkpoint-dir")
    fuse = grid.parse_fuse(args.fuse)
    ctx = init_distributed(args.device)
    try:
        if ctx.distributed and args.jobs > 1:
            raise GammaGuideError("--jobs runs worker processes of its own; under torchrun use --jobs 1")
        if ctx.distributed and not task.distributed:
            raise GammaGuideError(f"{task.label} grids run in one process; use --jobs N for runs at once, not torchrun")
        runs = len(grid.grid(base, arms, seeds)[shard[0]::shard[1]])
        fuse = grid.resolve_fuse(fuse, base, runs, args.jobs, ctx, args.data_dir, log=_log, compile=args.compile)
        if args.compile and fuse == 1:
            raise GammaGuideError("--compile compiles fused groups: give --fuse N with N > 1 (here it is 1)")
        if auto:
            base = replace(base, epochs=grid.auto_epochs(base, runs, args.jobs, args.time_budget,
                                                         data_dir=args.data_dir, device=args.device, log=_log,
                                                         fuse=fuse, compile=args.compile))
        configs = grid.grid(base, arms, seeds)
        _log(f"protocol {protocol.name}: {len(arms)} arms ({', '.join(arms)}) x {len(seeds)} seeds, {base.model} on "
             f"{base.data}, {base.epochs} epochs, {task.optimizer_name} weight decay {base.weight_decay}")
        grid.run_grid(configs, args.out, data_dir=args.data_dir, device=args.device, shard=shard, jobs=args.jobs,
                      retry_failed=args.retry_failed, ctx=ctx, checkpoints=args.checkpoint_dir, log=_log, fuse=fuse,
                      compile=args.compile)
        if ctx.is_main and not args.no_report and shard == (0, 1):
            _report_if_complete(configs, Path(args.out))
        return 0
    finally:
        shutdown(ctx)


def _check_data(spec: str, data_dir: str | None) -> None:
    """Where the data SPEC points must exist (a tree, a zip, a text folder); raises the loaders' own
    one-line error otherwise. Specs without a path (torchvision's cifar10) are found when loaded."""
    from .data import resolve_folder
    from .text_data import TASKS, resolve_text

    kind, _, path = spec.strip().partition(":")
    if kind in TASKS:
        resolve_text(kind, path or None, data_dir)
    elif kind == "imagefolder" or (kind in ("cifar10", "cifar100") and path):
        resolve_folder(path or None, data_dir)


def _report_if_complete(configs, out: Path) -> None:
    from .report import write_report
    from .results import RESULTS_NAME, finished_keys

    done = finished_keys(out / RESULTS_NAME)
    if all(c.key() in done for c in configs):
        try:
            path = write_report(out / RESULTS_NAME, out)
        except GammaGuideError as exc:
            _log(f"no report: {exc}")
            return
        _log(f"report: {path}")


def run_report(args) -> int:
    from .report import write_claims, write_report
    from .results import describe_skipped, read_results, usable_runs

    if args.claims and args.title:
        raise GammaGuideError("--title is the full report's heading; --claims prints the claims table only "
                              "(leave out one of them)")
    if not args.claims and not args.out:
        raise GammaGuideError("report needs --out DIR (where report.md and the plots go), or --claims to print "
                              "the claims table only")
    if args.out:
        _writable_dir(args.out)
    missing = [p for p in args.results if not Path(p).is_file()]
    if not missing:
        records, skipped = read_results(args.results)
        if not usable_runs(records):
            failed = sum(r.get("status") == "failed" for r in records)
            raise GammaGuideError(
                f"{', '.join(args.results)} holds no usable run: {len(records)} records, {failed} of them failed runs"
                + (f"; {describe_skipped(skipped)}" if skipped else "")
                + "; a report needs finished runs (gammaguide ablate or train writes them)")
    if args.claims:
        print(write_claims(args.results, args.out), end="")
        return 0
    path = write_report(args.results, args.out, plots=not args.no_plots, title=args.title)
    print(path)
    return 0
