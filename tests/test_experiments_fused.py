"""Fused groups (``ablate --fuse N``): N runs trained as one network must be exactly N separate
runs. Float64 is the strict check (1e-10 relative); float32 is checked against a noise floor
measured in the test; then records, failures, resume and the command line."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gammaguide import GammaGuideError
from gammaguide import models as M
from gammaguide.cli import main
from gammaguide.experiments import data as D
from gammaguide.experiments import fused as FU
from gammaguide.experiments import grid as FG
from gammaguide.experiments import results as R
from gammaguide.experiments.data import Dataset, epoch_plan
from gammaguide.experiments.distributed import DistContext
from gammaguide.experiments.config import TrainConfig
from gammaguide.experiments.fused import unfuse_checkpoint
from gammaguide.experiments.trainer import Trainer, Trainer as FusedTrainer

from experiment_helpers import interrupt_in_epoch_two

# The tiny ImageFolder ``tree`` and the dataset cache in a temporary folder come from conftest.py.
pytestmark = pytest.mark.usefixtures("dataset_cache")

CPU = DistContext(0, 1, 0, torch.device("cpu"))
ARMS = ("guidelines", "only:shortcut", "all", "no_gamma")
SEEDS = (0, 1, 0, 2)  # two runs share a seed (and so their batches), as the arms of a grid do


def synthetic(size: int, train: int = 48, test: int = 20) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset("synthetic", torch.randint(0, 256, (train, 3, size, size), dtype=torch.uint8, generator=g),
                   torch.arange(train) % 10, torch.randint(0, 256, (test, 3, size, size), dtype=torch.uint8,
                                                           generator=g),
                   torch.arange(test) % 10, tuple(str(c) for c in range(10)))


def _group(base: TrainConfig, arms=ARMS, seeds=SEEDS) -> list[TrainConfig]:
    return [replace(base, policy=a, seed=s) for a, s in zip(arms, seeds, strict=True)]


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def tiny_preact(monkeypatch):
    """The built-in pre-activation ResNet's classes at a width the float64 test can afford."""
    monkeypatch.setitem(M.MODELS, "tiny_preact", lambda num_classes=10: M.ResNet(
        M.PreActBlock, [1, 1, 1], [8, 16, 32], num_classes, 8, preact=True))
    return "tiny_preact"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _rel_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Largest difference over a run's tensors of one kind, relative to their largest value: a
    tensor that is zero in exact arithmetic (the β of a BatchNorm whose output is normalized
    again gets a gradient of 1e-17) compares at the scale of the others."""
    scale = max(float(b.abs().max()) for _, b in pairs)
    return max(float((a - b).abs().max()) for a, b in pairs) / max(scale, 1e-300)


def _compare_steps(fused_configs, solo_configs, data, steps: int) -> dict[str, float]:
    """Train a fused group and the same runs alone for ``steps`` SGD steps; the largest relative
    difference of each quantity over runs, steps and tensors."""
    solo = [Trainer(c, data, CPU, progress=False) for c in solo_configs]
    group = FusedTrainer(fused_configs, data, CPU, progress=False)
    n = group.n
    worst: dict[str, float] = {}

    def note(key: str, value: float) -> None:
        worst[key] = max(worst.get(key, 0.0), value)

    for step, (x, y) in zip(range(steps), group.epoch_batches(0), strict=False):
        losses, logits = group.forward_backward(x, y)
        for m, t in enumerate(solo):
            plan = epoch_plan(len(t.train_y), t.cfg.seed, 0)
            idx = plan.order[step * t.cfg.batch_size:(step + 1) * t.cfg.batch_size]
            xs = t.augment(t.train_x[idx], plan.dy[idx], plan.dx[idx], plan.flip[idx])
            assert torch.equal(xs, x[m]) and torch.equal(t.train_y[idx], y[m])  # its own batch, crops, flips
            t.model.train()
            out = t.model(xs)
            loss = F.cross_entropy(out, t.train_y[idx])
            t.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            note("loss", abs(float(loss.detach()) - float(losses[m].detach())) / abs(float(loss.detach())))
            note("train logits", _rel(logits[:, m].detach(), out.detach()))
            own = dict(t.model.named_parameters())
            note("gradient", _rel_all([(FU.unfuse_tensor(p.grad, n, m, own[k]), own[k].grad)
                                       for k, p in group.model.named_parameters()]))
            t.optimizer.step()
            t.scheduler.step()
        group.optimizer_step()
    names = [k for k, _ in group.model.named_parameters()]
    for m, t in enumerate(solo):
        mine, theirs = group.unfused_state(m), t.model.state_dict()
        note("parameter", _rel_all([(mine[k], theirs[k]) for k, _ in t.model.named_parameters()]))
        note("BN statistics", _rel_all([(mine[k], v) for k, v in theirs.items() if "running" in k]))
        own = dict(t.model.named_parameters())
        note("momentum", _rel_all([(FU.unfuse_tensor(group.optimizer.state[p]["momentum_buffer"], n, m, own[k]),
                                    t.optimizer.state[own[k]]["momentum_buffer"])
                                   for p, k in zip(group.params, names, strict=True)]))
        t.model.eval()
        group.model.eval()
        x = t.augment.normalize(t.test_x)
        with torch.no_grad():
            fused_logits = group.model(FU.fuse_inputs(x.unsqueeze(0).expand(n, *x.shape)))
            note("eval logits", _rel(fused_logits[:, m], t.model(x)))
    return worst


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("model", ["resnet20", "tiny_preact"])
def test_float64_fused_group_is_exactly_four_separate_runs(model, float64, tiny_preact, capsys):
    """4 runs, 4 policies (one decays only the projection shortcuts' γ), Nesterov SGD with a
    strong weight decay so that the policies differ within 3 steps: every per-run quantity agrees
    to 1e-10 relative (measured: 1e-13 at most). Swapping two runs' policies must break it."""
    data = synthetic(8)
    base = TrainConfig(model=model, data="synthetic", epochs=2, batch_size=16, nesterov=True, weight_decay=5e-2,
                       variance_batch=8)
    runs = _group(base)
    worst = _compare_steps(runs, runs, data, steps=3)
    with capsys.disabled():
        print(f"\n{model} float64 fused vs separate, max relative difference: "
              + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    assert set(worst) == {"loss", "train logits", "gradient", "parameter", "BN statistics", "momentum",
                          "eval logits"}
    assert all(v <= 1e-10 for v in worst.values()), worst
    swapped = _group(base, arms=("only:shortcut", "guidelines", "all", "no_gamma"))
    control = _compare_steps(swapped, runs, data, steps=1)
    assert control["parameter"] > 1e-6 and control["momentum"] > 1e-6, control  # the comparison can fail


def test_float32_fused_group_within_the_measured_noise_floor():
    """Two correct float32 computations of one network drift apart within a few steps (a
    pre-ReLU value near zero flips), so no fixed tolerance is right. The floor is measured here:
    the same runs with oneDNN convolutions switched off, for the separate runs and for the fused
    group. If both are within their own noise of the exact trajectory, they are within the sum
    of the two floors of each other. The first loss sees no training yet: within 1e-6."""
    data = synthetic(32, train=48)
    base = TrainConfig(model="resnet20", data="synthetic", epochs=1, batch_size=16, nesterov=True,
                       weight_decay=5e-2, variance_batch=8)
    runs = _group(base, ARMS[:3], SEEDS[:3])

    def trajectories(fused: bool, onednn: bool) -> list[tuple[list[float], torch.Tensor]]:
        """Per run: the losses of 3 steps and the final parameters and statistics as one vector."""
        with torch.backends.mkldnn.flags(enabled=onednn):
            if fused:
                group = FusedTrainer(runs, data, CPU, progress=False)
                losses = []
                for _, (x, y) in zip(range(3), group.epoch_batches(0), strict=False):
                    losses.append(group.forward_backward(x, y)[0].tolist())
                    group.optimizer_step()
                states = [group.unfused_state(m) for m in range(group.n)]
                per_run = [[ls[m] for ls in losses] for m in range(group.n)]
            else:
                states, per_run = [], []
                for c in runs:
                    t = Trainer(c, data, CPU, progress=False)
                    plan, losses = epoch_plan(len(t.train_y), c.seed, 0), []
                    t.model.train()
                    for step in range(3):
                        idx = plan.order[step * 16:(step + 1) * 16]
                        x = t.augment(t.train_x[idx], plan.dy[idx], plan.dx[idx], plan.flip[idx])
                        loss = F.cross_entropy(t.model(x), t.train_y[idx])
                        t.optimizer.zero_grad()
                        loss.backward()
                        t.optimizer.step()
                        t.scheduler.step()
                        losses.append(float(loss.detach()))
                    states.append(t.model.state_dict())
                    per_run.append(losses)
        vectors = [torch.cat([v.flatten() for v in s.values() if v.is_floating_point()]) for s in states]
        return list(zip(per_run, vectors, strict=True))

    def distance(a, b) -> tuple[float, float, float]:
        first = max(abs(x[0][0] - y[0][0]) / abs(y[0][0]) for x, y in zip(a, b, strict=True))
        later = max(abs(p - q) / abs(q) for x, y in zip(a, b, strict=True) for p, q in zip(x[0][1:], y[0][1:],
                                                                                             strict=True))
        state = max(float((x[1] - y[1]).norm() / y[1].norm()) for x, y in zip(a, b, strict=True))
        return first, later, state

    solo, fused = trajectories(False, True), trajectories(True, True)
    floor_solo = distance(trajectories(False, False), solo)
    floor_fused = distance(trajectories(True, False), fused)
    gap = distance(fused, solo)
    print(f"\nfloat32 (first loss, later losses, state): fused vs separate {gap}; floor of the separate runs "
          f"{floor_solo}; of the fused group {floor_fused}")
    assert gap[0] <= 1e-6
    assert floor_solo[1] > 0 and floor_fused[1] > 0  # the floor is real: the check is not vacuous
    assert gap[1] <= floor_solo[1] + floor_fused[1]
    assert gap[2] <= floor_solo[2] + floor_fused[2]


# ----------------------------------------------------------------------------- records and failures


def _same_records(solo: list, fused: list, tolerance: float) -> None:
    """The records agree key by key; numbers to ``tolerance`` relative; timings aside."""

    def walk(a, b, path):
        assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, path
        if isinstance(a, dict):
            assert a.keys() == b.keys(), path
            for k in a:
                walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        elif isinstance(a, float) and not (math.isnan(a) and math.isnan(b)):
            assert abs(a - b) <= tolerance * abs(a), (path, a, b)
        elif not isinstance(a, float):
            assert a == b, (path, a, b)

    for s, f in zip(solo, fused, strict=True):
        s, f = s.to_json(), f.to_json()
        for rec in (s, f):
            for k in ("train_images_per_s", "wall_s", "environment"):
                rec.pop(k)
            for row in rec["history"]:
                row.pop("train_images_per_s")
        walk(s, f, s["arm"])


def test_fused_records_equal_separate_records_and_a_nonfinite_run_stops_alone(float64, tmp_path):
    """Through ``run()``: two epochs, evaluation, both mechanisms (|γ|, lr/‖γ‖² per role and
    var(branch)/var(skip) per block), in float64. One run is poisoned (an infinite weight in its
    head), alone and in the group: it fails with the same reason, the others are unaffected, and
    the group's checkpoint unfuses into each run's own state and momentum."""
    data = synthetic(8)
    base = TrainConfig(model="resnet20", data="synthetic", epochs=2, batch_size=16, nesterov=True, weight_decay=5e-2,
                       variance_batch=8, epoch_test_subset=10)
    runs = _group(base, ARMS[:3], SEEDS[:3])

    def poison(state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            state["fc.weight"][0, 0] = float("inf")

    solo_trainers = [Trainer(c, data, CPU, progress=False) for c in runs]
    poison(solo_trainers[1].model.state_dict())
    solo = [t.run() for t in solo_trainers]
    group = FusedTrainer(runs, data, CPU, progress=False, checkpoint=tmp_path / "group.pt")
    poison(group.unfused_state(1))
    fused = group.run()
    assert [r.status for r in fused] == ["ok", "failed", "ok"]
    assert fused[1].reason == solo[1].reason and "non-finite training loss" in fused[1].reason
    assert fused[1].history == [] and fused[1].test_acc is None
    assert fused[0].environment["fused_runs"] == 3
    _same_records(solo, fused, 1e-10)
    unfused = unfuse_checkpoint(tmp_path / "group.pt")
    for m in (0, 2):
        t, mine = solo_trainers[m], unfused[runs[m].key()]
        assert _rel_all([(mine["model"][k], v) for k, v in t.model.state_dict().items()
                         if v.is_floating_point()]) <= 1e-10
        assert _rel_all([(mine["momentum"][k], t.optimizer.state[p]["momentum_buffer"])
                         for k, p in t.model.named_parameters()]) <= 1e-10


def test_killed_group_resumes_from_its_checkpoint_with_the_same_records(tmp_path):
    data = synthetic(16)
    base = TrainConfig(model="resnet20", data="synthetic", epochs=2, batch_size=16, variance_batch=8)
    runs = _group(base, ARMS[:2], SEEDS[:2])
    whole = FusedTrainer(runs, data, CPU, progress=False).run()
    ckpt = tmp_path / "group.pt"
    interrupt_in_epoch_two(FusedTrainer(runs, data, CPU, progress=False, checkpoint=ckpt))
    resumed = FusedTrainer(runs, data, CPU, progress=False, checkpoint=ckpt)
    assert resumed.start_epoch == 1
    _same_records(whole, resumed.run(), 0.0)  # CPU training is deterministic: identical
    # a checkpoint of other runs is not taken for this group's
    other = FusedTrainer(_group(base, ARMS[1:3], SEEDS[1:3]), data, CPU, progress=False, checkpoint=ckpt)
    assert other.start_epoch == 0


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", M.list_models())
def test_every_builtin_model_fuses(name):
    torch.manual_seed(0)
    FU.check_fusable(M.create_model(name), torch.randn(2, 3, 8, 8))


class _ChannelMean(nn.Module):
    """A forward that averages over channels: fine for one run, mixes runs when fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        x = x - x.mean(1, keepdim=True)
        return self.fc(x.mean((2, 3)))


def test_a_model_that_cannot_fuse_gets_one_clear_error():
    with pytest.raises(GammaGuideError, match=r"cannot fuse module 'norm' \(LayerNorm\)"):
        FU.fuse_structure(_with_layernorm(), 2)
    with pytest.raises(GammaGuideError, match="the forward of '_ChannelMean' mixes the channels of different runs"):
        FU.check_fusable(_ChannelMean(), torch.randn(2, 3, 8, 8))


def _with_layernorm() -> nn.Module:
    m = nn.Module()
    m.conv = nn.Conv2d(3, 4, 3)
    m.norm = nn.LayerNorm(4)
    return m


# ----------------------------------------------------------------------------- grids and the command line


def test_groups_are_even_and_only_runs_that_differ_in_policy_and_seed_fuse():
    base = TrainConfig(model="resnet20", epochs=1)
    grid = [replace(base, policy=a, seed=s) for s in range(5) for a in ("all", "no_gamma", "guidelines")]
    groups = FG.make_groups(grid, 4)
    assert [len(g) for g in groups] == [4, 4, 4, 3]
    assert [c.key() for g in groups for c in g] == [c.key() for c in grid]  # every run once, grid order
    other = [replace(c, lr=0.05) for c in grid[:3]]
    mixed = FG.make_groups(grid[:3] + other, 8)
    assert sorted(len(g) for g in mixed) == [3, 3]
    with pytest.raises(GammaGuideError, match="differ in more than policy and seed"):
        FusedTrainer([grid[0], other[1]], synthetic(8), CPU, progress=False)


SMOKE = ["ablate", "--protocol", "smoke", "--arms", "no_gamma,only:shortcut,guidelines", "--seeds", "0,1",
         "--batch-size", "16", "--subset", "40", "--test-subset", "20", "--no-report"]


def _keys(obj, prefix="") -> set[str]:
    if isinstance(obj, dict):
        return set().union(*({f"{prefix}{k}"} | _keys(v, f"{prefix}{k}.") for k, v in obj.items())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_keys(v, prefix) for v in obj)) if obj else set()
    return set()


def test_fused_smoke_grid_writes_the_same_runs_and_keys_as_the_separate_grid(tree, tmp_path):
    for fuse in ("1", "4"):
        assert main(SMOKE + ["--data", f"imagefolder:{tree}", "--fuse", fuse, "--out", str(tmp_path / fuse)]) == 0
    separate = {r["key"]: r for r in R.read_lines(tmp_path / "1" / R.RESULTS_NAME)}
    fused = {r["key"]: r for r in R.read_lines(tmp_path / "4" / R.RESULTS_NAME)}
    assert len(separate) == 6 and separate.keys() == fused.keys()
    for key, rec in separate.items():
        assert _keys(fused[key]) - {"environment.fused_runs"} == _keys(rec), key
        assert fused[key]["status"] == rec["status"] == "ok"
        assert fused[key]["environment"]["fused_runs"] == 3  # 6 runs in groups of at most 4: 3 + 3
        assert fused[key]["roles"] == rec["roles"] and fused[key]["settings"] == rec["settings"]
    assert not list((tmp_path / "4" / "checkpoints").glob("*.pt"))


def _env(tmp_path_factory) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env[D.CACHE_ENV] = str(tmp_path_factory.getbasetemp() / "cache")
    return env


def test_fused_grid_killed_with_sigkill_resumes_without_losing_or_repeating_a_run(tree, tmp_path_factory,
                                                                                   tmp_path):
    """Two groups of 3; the kill lands while a group is in flight (its checkpoint exists). The
    same command again, even with another --fuse, takes up that group's checkpoint and writes
    every run exactly once."""
    out = tmp_path / "grid"
    cmd = [sys.executable, "-m", "gammaguide"] + SMOKE + ["--data", f"imagefolder:{tree}", "--epochs", "2",
                                                          "--out", str(out)]
    proc = subprocess.Popen(cmd + ["--fuse", "3"], env=_env(tmp_path_factory), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(ckpts.glob("group-*.pt")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(ckpts.glob("group-*.pt")), "the kill should land while a group is in flight"
    before = R.read_lines(out / R.RESULTS_NAME)
    done = subprocess.run(cmd + ["--fuse", "6"], env=_env(tmp_path_factory), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming a fused group of 3 runs after epoch" in done.stderr
    after = R.read_lines(out / R.RESULTS_NAME)
    assert len(after) == 6 and len({r["key"] for r in after}) == 6  # no run lost, none twice
    assert after[:len(before)] == before
    assert not list(ckpts.glob("*.pt"))


@pytest.mark.parametrize("argv, message", [
    (["--fuse", "0"], "bad --fuse"),
    (["--fuse", "many"], "bad --fuse"),
    (["--fuse", "1", "--compile"], "--compile compiles fused groups"),
])
def test_fuse_option_errors_are_one_line_and_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["ablate", "--data", "cifar10", "--out", "x", "--device", "cpu"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_fuse_auto_on_the_cpu_trains_runs_alone():
    assert FG.resolve_fuse("auto", TrainConfig(), 8, 1, CPU) == FG.CPU_AUTO
    assert FG.resolve_fuse(4, TrainConfig(), 8, 1, CPU) == 4
    with pytest.raises(GammaGuideError, match="under torchrun use --fuse 1"):
        FG.resolve_fuse(4, TrainConfig(), 8, 1, DistContext(0, 2, 0, torch.device("cpu")))

