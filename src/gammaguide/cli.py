"""Command line: ``gammaguide inspect|train|ablate|report|monitor``.

Every error a user can cause ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings

from .errors import GammaGuideError

_INSPECT_EXAMPLES = """\
examples:
  gammaguide inspect resnet20
  gammaguide inspect torchvision:resnet50 --policy no_norm
  gammaguide inspect timm:vit_tiny_patch16_224 --json
  gammaguide inspect hf:llama-7b --meta
  gammaguide inspect my_model.py:build --input-shape 2,3,64,64
"""


def _add_inspect(sub) -> None:
    from .policy import POLICIES

    p = sub.add_parser(
        "inspect",
        help="show the role and decay decision of every normalization scale",
        description="Trace one forward pass of MODEL and show, for every normalization scale (γ), its role in the "
                    "dataflow and whether the policy applies weight decay to it.",
        epilog=_INSPECT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL",
                   help="a built-in name (resnet20, resnet50, preact_resnet18, ...), torchvision:NAME, timm:NAME, "
                        "hf:NAME (bert, gpt2, llama: tiny configs built offline; llama-7b with --meta) or "
                        "path/to/file.py:factory (factory() returns a model or a (model, example_inputs) tuple)")
    p.add_argument("--input-shape", metavar="SHAPE",
                   help="comma-separated sizes of the example input: an image batch (float), e.g. 1,3,32,32; for "
                        "hf: models the (batch, seq_len) of input_ids, e.g. 1,16. Default: the model's image size "
                        "(32x32 for the built-ins, 224x224 or timm's input size otherwise), 1,16 for hf: models")
    p.add_argument("--policy", default="guidelines", metavar="POLICY",
                   help=f"which γ get weight decay: {', '.join(POLICIES)} (default: guidelines)")
    p.add_argument("--meta", action="store_true",
                   help="build the model and inputs on the meta device: no memory, no compute (large models)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON (an 'entries' list, ...)")
    # Parsed by us, not by argparse, so that a bad value is a one-line error like every other.
    p.add_argument("--num-classes", metavar="N",
                   help="output classes of the model (built-ins default to 10, torchvision/timm to their own)")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from . import specs
    from .analysis import analyze
    from .policy import resolve_policy

    # Check every option before building anything: a typo should not cost a model build.
    policy = resolve_policy(args.policy)
    shape = None if args.input_shape is None else specs.parse_shape(args.input_shape)
    num_classes = _parse_num_classes(args.num_classes)
    meta = args.meta or _too_large(shape)
    loaded = specs.load(args.model, input_shape=shape, meta=meta, num_classes=num_classes)
    with warnings.catch_warnings():
        # The model's own warnings during the forward pass are not findings; ours are in the report.
        warnings.simplefilter("ignore")
        report = analyze(loaded.model, loaded.example_inputs, policy, warn=False)
    if not report.entries:
        raise GammaGuideError(_no_norms_message(args.model, loaded.model, report))
    if args.json:
        print(json.dumps({"model": args.model, "meta": bool(meta), **report.to_dict()}, indent=2))
    else:
        _print_report(report, args.model)
    return 0


# An example input larger than this is not allocated: the model and its input are built on the
# meta device (as with --meta) and analyzed on shapes alone.
MAX_INPUT_BYTES = 2**30


def _too_large(shape: tuple[int, ...] | None) -> bool:
    if shape is None:
        return False
    size = 8 * math.prod(shape)  # float32 images or int64 token ids: at most 8 bytes an element
    if size <= MAX_INPUT_BYTES:
        return False
    print(f"gammaguide: note: an input of shape {','.join(map(str, shape))} would take {_bytes(size)}; building "
          f"the model and its input on the meta device (as --meta does) to analyze it on shapes alone",
          file=sys.stderr)
    return True


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"


def _parse_num_classes(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise GammaGuideError(f"bad --num-classes {text!r}: give a positive integer, e.g. --num-classes 100")
    return n


def _no_norms_message(spec: str, model, report) -> str:
    msg = (f"{spec} ({type(model).__name__}) has no normalization layers that gammaguide recognises, so there is "
           f"no γ to decide about; try a model with BatchNorm/LayerNorm/GroupNorm/RMSNorm layers, or register a "
           f"hand-written norm class with gammaguide.register_norm_class")
    if report.warnings:
        msg += f" (it noticed: {report.warnings[0]})"
    return msg


# ----------------------------------------------------------------------------- table output


def _verdict(entries) -> str:
    decisions = {e.decay for e in entries}
    return "decay" if decisions == {True} else "no decay" if decisions == {False} else "mixed"


def _paper(role: str) -> str:
    from .roles import PAPER_CATEGORY

    category = PAPER_CATEGORY.get(role)
    return f"γ_{category}" if category else "-"


def _summary(report) -> str:
    n = len(report.entries)
    decayed = sum(e.decay for e in report.entries)
    line = f"{n} γ: {decayed} decayed, {n - decayed} not"
    others = report.others
    if others:
        k = sum(p.decay for p in others)
        if k in (0, len(others)):
            line += f"; {len(others)} other 1-D params {'decayed' if k else 'not decayed'}"
        else:
            line += f"; {len(others)} other 1-D params: {k} decayed, {len(others) - k} not"
    return line


def _rows(entries, mixed: bool) -> list[tuple[str, str, str, str]]:
    """(γ, module, norm type, reason); in a mixed role each row says its own decision."""
    rows = []
    for e in entries:
        reason = f"[{'decay' if e.decay else 'no decay'}] {e.reason}" if mixed else e.reason
        rows.append((e.param_name, e.module_name or "(model)", e.norm_type, reason))
    return rows


def _header(report, spec: str) -> str:
    inputs = ", ".join(report.input_shapes) or "no inputs"
    how = "traced on meta tensors" if report.traced_on == "meta" else "traced for real (the model needs values)"
    return f"gammaguide inspect {spec}  ·  policy {report.policy}  ·  input {inputs}  ·  {how}"


def _others_line(report, limit: int = 8) -> str | None:
    names = [p.name for p in report.others]
    if not names:
        return None
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"other 1-D parameters (not γ, β or bias): {shown}"


def _print_report(report, spec: str) -> None:
    try:
        import rich  # noqa: F401
    except ImportError:
        print(_plain_report(report, spec))
    else:
        _rich_report(report, spec)


def _plain_report(report, spec: str) -> str:
    """The table as plain text, for when rich is not installed."""
    by_role = {r: es for r, es in report.by_role().items() if es}
    lines = [_header(report, spec), "", f"{'role':<16} {'paper':<9} {'γ':>4}  decision"]
    for role, entries in by_role.items():
        lines.append(f"{role:<16} {_paper(role):<9} {len(entries):>4}  {_verdict(entries)}")
    for role, entries in by_role.items():
        verdict = _verdict(entries)
        rows = _rows(entries, verdict == "mixed")
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines += ["", f"{role} ({_paper(role)}): {len(entries)} γ, {verdict}"]
        lines += [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
    others = _others_line(report)
    if others:
        lines += ["", others]
    if report.warnings:
        lines.append("")
        lines += [f"warning: {w}" for w in report.warnings]
    lines += ["", _summary(report)]
    return "\n".join(lines)


def _rich_report(report, spec: str) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    by_role = {r: es for r, es in report.by_role().items() if es}
    parts: list = [f"[bold]{escape(_header(report, spec))}[/]", ""]

    overview = Table(show_edge=False, box=None, padding=(0, 2), header_style="bold")
    for col, justify in (("role", "left"), ("paper", "left"), ("γ", "right"), ("decision", "left")):
        overview.add_column(col, justify=justify)
    for role, entries in by_role.items():
        verdict = _verdict(entries)
        overview.add_row(role, _paper(role), str(len(entries)), f"[{_style(verdict)}]{verdict}[/]")
    parts.append(overview)

    for role, entries in by_role.items():
        verdict = _verdict(entries)
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1), header_style="dim")
        for col in ("γ", "module", "norm", "reason"):
            table.add_column(col)
        for row in _rows(entries, verdict == "mixed"):
            table.add_row(*(escape(x) for x in row))
        parts += ["", f"[bold]{role}[/] ({_paper(role)}): {len(entries)} γ, [bold {_style(verdict)}]{verdict}[/]",
                  table]

    others = _others_line(report)
    if others:
        parts += ["", escape(others)]
    if report.warnings:
        parts.append("")
        parts += [f"[yellow]warning:[/] {escape(w)}" for w in report.warnings]
    parts += ["", f"[bold]{escape(_summary(report))}[/]"]

    if sys.stdout.isatty():
        console = Console(file=sys.stdout, highlight=False)
        for part in parts:
            console.print(part)
        return
    # Piped or captured: plain characters, no wrapping at 80 columns (long names stay on one
    # line, so grep works) and no trailing padding.
    console = Console(width=200, highlight=False, color_system=None, record=True, file=_Null())
    for part in parts:
        console.print(part)
    print("\n".join(line.rstrip() for line in console.export_text().splitlines()))


class _Null:
    """A file that drops what it is given (rich records the text for us)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _style(verdict: str) -> str:
    return {"decay": "green", "no decay": "red"}.get(verdict, "yellow")


# ----------------------------------------------------------------------------- entry point


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2 like every other error
    (argparse would print the whole usage block first)."""

    def error(self, message: str):
        print(f"gammaguide: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gammaguide", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_inspect(sub)
    from .experiments import cli as experiments_cli  # argparse definitions only; heavy imports stay lazy

    experiments_cli.register(sub)
    from . import monitor_plots  # `gammaguide monitor`: draws gg.Monitor's records (matplotlib imported lazily)

    monitor_plots.register(sub)
    return parser


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning on the command line: one line on stderr, not Python's two (with its source line)."""
    print(f"gammaguide: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn_in_one_line
            return int(args.func(args) or 0)
    except GammaGuideError as exc:
        # One line, whatever the message: scripts grep stderr, and a wrapped message reads like two errors.
        print(f"gammaguide: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gammaguide: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `gammaguide inspect ... --json | head`: the reader left, which is not an error of ours.
        # Point stdout at /dev/null so that the interpreter's final flush does not raise again.
        with contextlib.suppress(OSError, ValueError):  # stdout may not be a real file
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
