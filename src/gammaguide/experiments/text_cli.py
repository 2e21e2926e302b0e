"""``gammaguide train`` and ``gammaguide ablate`` for the text tasks (``--data sst2:...`` or
``--data multi30k:...``, or a text protocol): options, config and the two commands.

Only argparse definitions run at import time (``experiments/cli.py`` registers the options).
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from ..errors import GammaGuideError

# option -> (TextConfig field, type, help)
_OPTIONS = {
    "--width": ("width", int, "text models: width of the transformer"),
    "--layers": ("layers", int, "text models: transformer blocks (encoder and decoder each, for translation)"),
    "--heads": ("heads", int, "text models: attention heads"),
    "--dropout": ("dropout", float, "text models: dropout"),
    "--label-smoothing": ("label_smoothing", float, "text tasks: label smoothing of the loss"),
    "--vocab-size": ("vocab_size", int, "text tasks: subword vocabulary learned on the training split"),
    "--max-len": ("max_len", int, "text tasks: tokens per sentence (longer ones are cut; translation: left out)"),
    "--beta2": ("beta2", float, "text tasks: AdamW's beta2"),
    "--epoch-test-subset": ("epoch_test_subset", int,
                            "test sentences scored every epoch but the last (default: all of them)"),
}


def add_options(p: argparse.ArgumentParser) -> None:
    """The text-only options (all default to the protocol's or TextConfig's values)."""
    group = p.add_argument_group("text tasks (--data sst2:PATH or multi30k:PATH)")
    for flag, (_, kind, text) in _OPTIONS.items():
        group.add_argument(flag, type=kind, default=None, help=text)


def reject_text_options(args) -> None:
    """For an image run: the text-only options given would be ignored, so they are an error."""
    given = [flag for flag, (name, _, _) in _OPTIONS.items() if getattr(args, name, None) is not None]
    if given:
        raise GammaGuideError(f"{', '.join(given)} apply to text models (--data sst2:PATH or multi30k:PATH); "
                              f"leave {'them' if len(given) > 1 else 'it'} out for an image model")


def is_text(args) -> bool:
    from .ablate import PROTOCOLS
    from .text_data import text_task
    from .text_train import TextConfig

    protocol = PROTOCOLS.get(getattr(args, "protocol", None) or "")
    return text_task(args.data) is not None or (protocol is not None and isinstance(protocol.config, TextConfig))


def config_from(args, base):
    """``base`` (a TextConfig) with every option the user gave; the model defaults to the
    task's pre-LN form when the base was made for the other task."""
    from .text_data import text_task
    from ..text_models import CLASSIFIERS, TRANSLATORS

    if getattr(args, "depth", None) is not None:
        raise GammaGuideError("--depth sets a CIFAR ResNet; for a text model use --layers")
    if getattr(args, "precision", None) or getattr(args, "memory_format", None):
        raise GammaGuideError("--precision and --memory-format set image runs; text runs train in float32 on the CPU "
                              "(bf16 autocast on CUDA): leave them out")
    if getattr(args, "sync_bn", None):
        raise GammaGuideError("--sync-bn is for image models under torchrun; text models have no BatchNorm")
    if getattr(args, "momentum", None) is not None or getattr(args, "nesterov", None):
        raise GammaGuideError("--momentum and --nesterov set SGD (image models); text models train with AdamW, "
                              "whose momentum is its beta1 = 0.9 (--beta2 sets the other)")
    changes = {}
    names = {f.name for f in fields(base)} - {"epochs", "policy", "seed"}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    cfg = replace(base, **changes)
    task = text_task(cfg.data)
    if task is None:
        raise GammaGuideError(f"--data {cfg.data!r} is not text data; text protocols take --data sst2:PATH or "
                              f"multi30k:PATH")
    if getattr(args, "model", None) is None:  # the protocol's model, or this task's first
        fit = CLASSIFIERS if task == "classify" else TRANSLATORS
        if cfg.model not in fit:
            cfg = replace(cfg, model=fit[0])
    return cfg


def _base(args):
    from .text_data import text_task
    from .text_train import TextConfig

    if text_task(args.data) == "translate":  # fairseq's transformer_iwslt_de_en recipe, scaled
        return TextConfig(model="seq2seq_postln", data=args.data, schedule="cosine", label_smoothing=0.1,
                          lr=5e-4, beta2=0.98, dropout=0.3, width=256, layers=3, max_len=128, batch_size=128,
                          weight_decay=1e-4, epochs=20, warmup_epochs=1.0)
    return TextConfig(data=args.data)


def run_train(args) -> int:
    from .cli import _int_epochs, _log
    from .distributed import init_distributed
    from .results import RESULTS_NAME
    from .text_train import TextTrainer, load_data

    base = _base(args)
    cfg = config_from(args, base)
    epochs = base.epochs if args.epochs is None else _int_epochs(args.epochs)
    cfg = replace(cfg, epochs=epochs, policy=args.policy, seed=args.seed)
    cfg.check()
    ctx = init_distributed(args.device)
    data = load_data(cfg, args.data_dir)
    results = Path(args.out) / RESULTS_NAME
    trainer = TextTrainer(cfg, data, ctx, checkpoint=Path(args.out) / "checkpoints" / f"{cfg.key()}.pt",
                          progress=not args.no_progress, log=_log)
    record = trainer.run()
    trainer.save_result(record, results)
    if record.status != "ok":
        _log(f"run failed: {record.reason}; recorded in {results}")
        return 1
    value = record.test_acc if record.metric == "test_acc" else record.test_bleu
    _log(f"{record.metric} {'-' if value is None else f'{value:.4f}'}; appended to {results}")
    return 0


def run_ablate(args) -> int:
    from . import ablate
    from .cli import _int_epochs, _listed, _log, _report_if_complete, _writable_dir
    from .distributed import init_distributed
    from .text_data import text_task
    from .text_train import TextConfig, default_arms

    protocol = ablate.PROTOCOLS.get(args.protocol)
    if protocol is None:
        raise GammaGuideError(f"unknown --protocol {args.protocol!r}; use {', '.join(ablate.PROTOCOLS)}")
    if not isinstance(protocol.config, TextConfig):
        name = args.data.partition(":")[0]
        if args.protocol != "smoke":
            text = [p for p in ablate.PROTOCOLS if p.startswith(name + "-")]
            raise GammaGuideError(f"--protocol {args.protocol} trains an image model; for {name} use "
                                  f"--protocol {' or '.join(text)}")
        protocol = ablate.PROTOCOLS[f"{name}-smoke"]  # the default protocol, for this task
    if text_task(args.data) != protocol.config.task:
        raise GammaGuideError(f"--protocol {protocol.name} is for {protocol.config.data} data, not {args.data}")
    auto = args.epochs == "auto"
    if auto and not args.time_budget:
        raise GammaGuideError("--epochs auto needs --time-budget SECONDS (the wall time the grid may take)")
    if args.jobs < 1:
        raise GammaGuideError(f"--jobs must be at least 1, got {args.jobs}")
    if str(args.fuse) not in ("auto", "1") or args.compile:
        raise GammaGuideError("--fuse and --compile fuse image grids (BatchNorm ResNets); text grids train each run "
                              "alone: leave them out, and use --jobs N for runs at once")
    _listed(args.arms, "--arms", "guidelines,no_gamma")
    _listed(args.seeds, "--seeds", "0,1,2")
    base = config_from(args, protocol.config)
    if args.epochs is not None and not auto:
        base = replace(base, epochs=_int_epochs(args.epochs))
    base.check()
    arms = ablate.parse_arms(args.arms) if args.arms else default_arms(base.model, cfg=base, log=_log)
    seeds = ablate.parse_seeds(args.seeds, protocol.seeds)
    shard = ablate.parse_shard(args.shard)
    _writable_dir(args.out)
    if args.checkpoint_dir:
        _writable_dir(args.checkpoint_dir, "--checkpoint-dir")
    ctx = init_distributed(args.device)
    if ctx.distributed:
        raise GammaGuideError("text grids run in one process; use --jobs N for runs at once, not torchrun")
    if auto:
        from .text_train import auto_epochs

        runs = len(ablate.grid(base, arms, seeds)[shard[0]::shard[1]])
        base = replace(base, epochs=auto_epochs(base, runs, args.jobs, args.time_budget, data_dir=args.data_dir,
                                                device=args.device, log=_log))
    configs = ablate.grid(base, arms, seeds)
    _log(f"protocol {protocol.name}: {len(arms)} arms ({', '.join(arms)}) x {len(seeds)} seeds, {base.model} on "
         f"{base.data}, {base.epochs} epochs, AdamW (decoupled) weight decay {base.weight_decay}")
    ablate.run_grid(configs, args.out, data_dir=args.data_dir, device=args.device, shard=shard, jobs=args.jobs,
                    retry_failed=args.retry_failed, ctx=ctx, checkpoints=args.checkpoint_dir, log=_log)
    if not args.no_report and shard == (0, 1):
        _report_if_complete(configs, Path(args.out))
    return 0
