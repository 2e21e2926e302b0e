"""Mutation testing of one module of the decision path or of the statistics, with mutmut.

    python scripts/mutation.py policy            # one module: its score and its surviving mutants
    python scripts/mutation.py --list            # the modules and the tests that cover each
    python scripts/mutation.py stats --jobs 2 --keep /tmp/mut-stats
    python scripts/mutation.py stats --keep /tmp/mut-stats --recheck NAME...   # after a new test

mutmut (``pip install -e '.[mutation]'``) makes every one-line change it knows to the module
(an operator, a comparison, a constant, a string, a call's argument...), runs the tests that cover
the changed function against each mutant, and counts the mutants no test fails on. Each module's
tests and its equivalent mutants (changes that no input can tell apart: listed with why) are in
``scripts/mutation.toml``; a surviving mutant that is not listed there is a behaviour no test
pins: add a test, or list it with the reason it cannot be told apart.

mutmut rewrites the files it mutates, so everything runs on a private copy of the working tree
(its tracked and untracked, not ignored, files) in a temporary folder: the checkout is never
touched, and your uncommitted tests count (``--committed``: the last commit instead, without
anybody's uncommitted edits). Run it with ``nice -n 19`` on a shared machine; every process it
starts gets ``OMP_NUM_THREADS=1``. Not part of CI (docs/testing.md).

Exit status: 0 when every mutant is killed or listed as equivalent, 1 when some survive, 2 on a
usage or setup error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).with_suffix(".toml")
# mutmut's exit codes of a mutant's test run (mutmut.stats.status_by_exit_code): a timeout means the
# mutant loops or stalls, which the tests notice, so it counts as killed.
KILLED = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"}
NOT_RUN = {None: "not checked", 2: "interrupted", 34: "skipped"}


def load_config() -> dict:
    with open(CONFIG, "rb") as f:
        return tomllib.load(f)


def private_copy(dest: Path, committed: bool) -> None:
    """The working tree's files as git sees them (tracked, and untracked but not ignored), copied;
    ``committed``: the files of the last commit instead."""
    if committed:
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def mutmut_config(module: dict, dest: Path) -> str:
    """The [tool.mutmut] table for one module, appended to the copy's pyproject.toml."""
    others = sorted(p.name for p in dest.iterdir() if p.name not in ("src", "tests", "pyproject.toml"))
    table = {
        "source_paths": ["src/gammaguide"],
        "only_mutate": [module["path"]],
        "also_copy": others,  # what the tests read: README.md, docs/, results/, scripts/...
        "pytest_add_cli_args_test_selection": module["tests"],
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-x", "-q", *module.get("pytest_args", [])],
        # torch is not fork-safe once it has run: each mutant's tests run in a process forked from a
        # server that has imported them and run nothing.
        "process_isolation": "forkserver",
        # mutmut's CPU-time limit is 15x a test's measured time + this. A test's first call of scipy
        # (imported lazily) or of a torch kernel costs a second or more in the forked process that
        # it did not cost when timed: with mutmut's default of 1 s those mutants "time out" (and
        # would count as killed) whatever they change.
        "timeout_constant": 30.0,
        "use_git_change_detection": False,
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def run(name: str, jobs: int, keep: Path | None, committed: bool = False) -> int:
    config = load_config()
    module = config["modules"].get(name)
    if module is None:
        print(f"unknown module {name!r}; choose one of {', '.join(config['modules'])}", file=sys.stderr)
        return 2
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=f"gammaguide-mutation-{name}-"))
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / "mutants").exists():
        print(f"{workdir} is not empty and holds no earlier run: give an empty or new folder", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "mutants").exists():  # with --keep and an earlier run: resume it
        private_copy(workdir, committed)
        with open(workdir / "pyproject.toml", "a") as f:
            f.write(mutmut_config(module, workdir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # mutmut puts its mutated copy first on the path itself
    mutmut = _mutmut()
    start = time.monotonic()
    proc = subprocess.run([mutmut, "run", "--max-children", str(jobs)], cwd=workdir, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - start
    meta = workdir / "mutants" / (module["path"] + ".meta")
    if proc.returncode != 0 or not meta.exists():
        print(f"mutmut failed (exit {proc.returncode}) in {workdir}:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return 2
    return summarize(name, module, workdir, meta, wall, keep is not None)


def summarize(name: str, module: dict, workdir: Path, meta: Path, wall: float, kept: bool) -> int:
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
    equivalent = {e["mutant"]: e for e in module.get("equivalent", [])}
    outside = {e["mutant"]: e for e in module.get("outside", [])}  # pinned by a test mutmut cannot run as is
    killed, survived, not_run, listed, pinned = [], [], [], [], []
    for mutant, code in sorted(codes.items(), key=lambda kv: _order(kv[0])):
        if code in KILLED:
            killed.append(mutant)
        elif code in NOT_RUN:
            not_run.append(mutant)
        elif mutant in equivalent:
            listed.append(mutant)
        elif mutant in outside:
            pinned.append(mutant)
        else:
            survived.append(mutant)  # survived (0), no tests (5, 33), suspicious, segfault
    stale = [m for m in equivalent if m not in codes or codes[m] in KILLED]
    counted = len(killed) + len(survived)
    score = 100.0 * len(killed) / counted if counted else 0.0
    timeouts = sum(KILLED[codes[m]] == "timeout" for m in killed)
    print(f"{name} ({module['path']}): {len(codes)} mutants, {len(listed)} equivalent, "
          f"{len(killed)} / {counted} killed ({score:.1f} %; {timeouts} of them by a timeout), "
          f"{len(survived)} survived"
          + (f", {len(pinned)} pinned by tests outside mutmut (not counted)" if pinned else "")
          + (f", {len(not_run)} not run" if not_run else "") + f"; {wall / 60:.1f} min")
    for mutant in survived:
        status = "no tests" if codes[mutant] in (5, 33) else f"exit {codes[mutant]}"
        print(f"\nsurvived ({status}): {mutant}")
        print(_diff(workdir, mutant))
    for mutant in stale:
        print(f"\nlisted as equivalent but {'killed' if mutant in codes else 'no longer made'}: {mutant} "
              f"(mutant numbers move when the module changes: check the list in {CONFIG.name})")
    if not kept:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"\nthe run is in {workdir} (`mutmut show NAME` there shows a mutant)")
    return 1 if survived or stale else 0


def recheck(name: str, keep: Path, mutants: list[str]) -> int:
    """Run the module's tests, as they are now in the checkout, against each named mutant of the run
    kept in ``keep``: a survivor checked against a new test in seconds, without a full run. Judged by
    pytest's exit status (1: a test failed), never by its summary line, where a strict xfail reads
    "xfailed". Exit status 0 when every one is killed."""
    module = load_config()["modules"].get(name)
    if module is None or not (keep / "mutants" / "src").is_dir():
        print(f"need a module of scripts/mutation.toml and a run kept with --keep (got {name!r}, {keep})",
              file=sys.stderr)
        return 2
    tests = [str(ROOT / t) for t in module["tests"]]
    alive = 0
    for mutant in mutants:
        # From a folder outside the checkout: there the editable install cannot shadow the mutated copy.
        env = {**os.environ, "MUTANT_UNDER_TEST": mutant, "PYTHONPATH": str(keep / "mutants" / "src"),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=tempfile.gettempdir(), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode
        verdict = {0: "survived", 1: "killed"}.get(code, f"not judged (pytest exit {code})")
        alive += code != 1
        print(f"{verdict}: {mutant}", flush=True)
    return 1 if alive else 0


def _mutmut() -> str:
    """mutmut's command: on PATH, or next to this Python (a virtual environment not activated)."""
    return shutil.which("mutmut") or str(Path(sys.executable).with_name("mutmut"))


def _order(mutant: str) -> tuple[str, int]:
    head, _, number = mutant.rpartition("__mutmut_")
    return head, int(number) if number.isdigit() else 0


def _diff(workdir: Path, mutant: str) -> str:
    shown = subprocess.run([_mutmut(), "show", mutant], cwd=workdir, capture_output=True, text=True)
    lines = [line for line in shown.stdout.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    return "\n".join(lines) or shown.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", help="a module of scripts/mutation.toml (see --list)")
    parser.add_argument("--list", action="store_true", help="list the modules and their tests")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (an earlier run there resumes)")
    parser.add_argument("--committed", action="store_true",
                        help="mutate the last commit, not the working tree (others' uncommitted edits left out)")
    parser.add_argument("--recheck", nargs="+", metavar="MUTANT",
                        help="with --keep: run today's tests against these mutants of the kept run, one by one")
    args = parser.parse_args(argv)
    if args.recheck:
        if args.keep is None or not args.module:
            parser.error("--recheck needs the module and --keep DIR of the run to recheck")
        return recheck(args.module, args.keep, args.recheck)
    if args.list or not args.module:
        for name, module in load_config()["modules"].items():
            print(f"{name:13} {module['path']}: {' '.join(module['tests'])}")
        return 0 if args.list else 2
    return run(args.module, args.jobs, args.keep, args.committed)


if __name__ == "__main__":
    sys.exit(main())
