"""Side-by-side timings of the core engine, printed as ratios measured in one run.

(a) our PGD vs torchattacks' PGD / PGDL2 on a classifier, configured alike;
(b) PGD-K on a small 2D DynUNet vs K x (one forward + input-gradient pass); with AMAT's criterion on every
    iterate; and that attack on MetaTensors (as a MONAI loader gives them) vs plain tensors;
(c) one AMAT iteration vs one SAT iteration (same attack steps): time, and peak memory
    (CUDA: max allocated; CPU: peak RSS growth of a fresh subprocess per trainer);
(d) APGD-K vs PGD-K on the same batch and loss (time, and the mean loss each reaches);
(e) the breaking-eps search of a batch: attacks per sample, and its time in units of one PGD-K.

Usage: python benchmarks/bench_core.py [--device cuda] [--repeats 5] [--steps 10] [--size 96] [--batch 4] [--amp]
torchattacks is optional (pip install --no-deps torchattacks); without it (a) is skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
from memory import child_env, peak_rss_growth_mb
from monai.data import MetaTensor
from monai.networks.nets import DynUNet

from monai_amat.attacks import APGD, PGD
from monai_amat.criteria import DiceCriterion
from monai_amat.engines import AMATTrainer, BreakingEps, SATTrainer
from monai_amat.handlers import MarginHandler
from monai_amat.losses import PerSampleDiceCELoss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def side_by_side(fns, device, repeats):
    """Median seconds of each function, run round-robin so drift of the machine hits all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def dynunet():
    return DynUNet(
        2,
        1,
        2,
        kernel_size=[3, 3, 3, 3],
        strides=[1, 2, 2, 2],
        upsample_kernel_size=[2, 2, 2],
        filters=[16, 32, 64, 128],
        norm_name="instance",
    )


def seg_batch(args, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, args.size, args.size, generator=g)
    y = (torch.rand(args.batch, 1, args.size, args.size, generator=g) > 0.7).float()
    return x.to(device), y.to(device)


def bench_torchattacks(args, device):
    try:
        import torchattacks
    except ImportError:
        return None
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(1024, 10),
    )
    net = net.to(device).eval()
    x = torch.rand(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)

    def ce(p, t):
        return torch.nn.functional.cross_entropy(p, t, reduction="none")

    res = {}
    for norm, eps, step, cls in (("linf", 8 / 255, 2 / 255, torchattacks.PGD), ("l2", 0.5, 0.1, torchattacks.PGDL2)):
        ours = PGD(
            ce, norm=norm, steps=args.steps, alpha=step * args.steps / eps, random_start=False, value_range=(0, 1)
        )
        ref = cls(net, eps=eps, alpha=step, steps=args.steps, random_start=False)
        t = side_by_side(
            {"ours": lambda ours=ours, eps=eps: ours(net, x, y, eps), "ref": lambda ref=ref: ref(x, y)},
            device,
            args.repeats,
        )
        t_ours, t_ref = t["ours"], t["ref"]
        diff = (ours(net, x, y, eps) - ref(x, y)).abs().max().item()
        res[norm] = {"ours_s": t_ours, "torchattacks_s": t_ref, "ratio": t_ours / t_ref, "max_abs_diff": diff}
    return res


def bench_pgd_cost(args, device):
    net = dynunet().to(device).eval()
    loss = PerSampleDiceCELoss()
    x, y = seg_batch(args, device)
    for p in net.parameters():
        p.requires_grad_(False)

    def one_pass():
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(loss(net(xi), y).sum(), xi)

    attack = PGD(loss, steps=args.steps)
    crit = DiceCriterion(0.5)
    t = side_by_side(
        {
            "one": one_pass,
            "pgd": lambda: attack(net, x, y, 1.0),
            "crit": lambda: attack.attack(net, x, y, 1.0, criterion=crit),
            "crit_meta": lambda: attack.attack(net, MetaTensor(x), MetaTensor(y), 1.0, criterion=crit),
        },
        device,
        args.repeats,
    )
    t_one, t_pgd, t_crit = t["one"], t["pgd"], t["crit"]
    return {
        "one_pass_s": t_one,
        "pgd_s": t_pgd,
        "pgd_with_criterion_s": t_crit,
        "ratio": t_pgd / (args.steps * t_one),
        "ratio_with_criterion": t_crit / (args.steps * t_one),
        "metatensor_vs_plain_with_criterion": t["crit_meta"] / t_crit,
    }


def bench_apgd(args, device):
    net = dynunet().to(device).eval()
    loss = PerSampleDiceCELoss()
    x, y = seg_batch(args, device)
    pgd, apgd = PGD(loss, steps=args.steps, alpha=2.5), APGD(loss, steps=args.steps)
    t = side_by_side({"pgd": lambda: pgd(net, x, y, 2.0), "apgd": lambda: apgd(net, x, y, 2.0)}, device, args.repeats)
    with torch.no_grad():
        reached = {name: float(loss(net(a(net, x, y, 2.0)), y).mean()) for name, a in (("pgd", pgd), ("apgd", apgd))}
    return {
        "pgd_s": t["pgd"],
        "apgd_s": t["apgd"],
        "ratio": t["apgd"] / t["pgd"],
        "mean_loss_pgd": reached["pgd"],
        "mean_loss_apgd": reached["apgd"],
    }


class CountingPGD(PGD):
    """PGD that counts its runs."""

    calls = 0

    def attack(self, *a, **kw):
        CountingPGD.calls += 1
        return super().attack(*a, **kw)


def bench_breaking(args, device):
    net = dynunet().to(device).eval()
    loss = PerSampleDiceCELoss()
    x, y = seg_batch(args, device)
    attack = CountingPGD(loss, steps=args.steps, alpha=2.5)
    with torch.no_grad():
        clean = loss(net(x), y)

    def criterion(pred, target):  # correct while the loss stays near its clean value: every sample needs bisection
        return loss(pred, target) < clean + 0.01

    probe = BreakingEps(criterion)
    t = side_by_side(
        {
            "pgd": lambda: attack(net, x, y, 2.0),
            "search": lambda: probe.search(attack, net, net, x, y, 4.0, 1.0),
        },
        device,
        args.repeats,
    )
    CountingPGD.calls = 0
    probe.search(attack, net, net, x, y, 4.0, 1.0)
    return {
        "attacks_per_sample": CountingPGD.calls,
        "search_s": t["search"],
        "search_in_pgd_runs": t["search"] / t["pgd"],
    }


def trainer(kind, args, device):
    net = dynunet().to(device)
    loss = PerSampleDiceCELoss()
    x, y = seg_batch(args, device)
    batch = {"image": x, "label": y, "index": torch.arange(args.batch)}
    common = dict(
        device=device,
        max_epochs=1,
        train_data_loader=[batch],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), 1e-3),
        loss_function=loss,
        attack=PGD(loss, steps=args.steps),
        amp=args.amp,
        decollate=False,
    )
    if kind == "amat":
        t = AMATTrainer(**common, margin_handler=MarginHandler(args.batch, delta=1.0), criterion=DiceCriterion(0.5))
    elif kind == "sat_mixed":
        t = SATTrainer(**common, eps=1.0, beta=0.5)
    else:
        t = SATTrainer(**common, eps=1.0, adversarial_only=True)
    t.state.epoch, t.state.iteration = 1, 1
    return lambda: t._iteration(t, batch)


def child_peak_rss(kind, args):
    """Peak RSS growth during one iteration, in a fresh process."""
    return peak_rss_growth_mb(trainer(kind, args, torch.device("cpu")))


def bench_amat_vs_sat(args, device):
    kinds = ("amat", "sat_mixed", "sat_adv_only")
    steps = {kind: trainer(kind, args, device) for kind in kinds}
    times = side_by_side(steps, device, args.repeats)
    res = {}
    for kind, step in steps.items():
        res[kind] = {"iteration_s": times[kind]}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            res[kind]["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            cmd = [sys.executable, __file__, "--child", kind] + [a for a in sys.argv[1:] if a != "--child"]
            out = subprocess.check_output(cmd, text=True, env=child_env())
            res[kind]["peak_mb"] = float(out.strip().splitlines()[-1])
    for kind in ("sat_mixed", "sat_adv_only"):
        res[f"amat/{kind}"] = {k: res["amat"][k] / res[kind][k] for k in ("iteration_s", "peak_mb") if res[kind][k] > 0}
    return res


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.child:
        print(child_peak_rss(args.child, args))
        return
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"batch {args.batch}x1x{args.size}x{args.size}, PGD steps {args.steps}, amp {args.amp}"
    )
    results = {
        "a_pgd_vs_torchattacks": bench_torchattacks(args, device),
        "b_pgd_vs_k_passes": bench_pgd_cost(args, device),
        "c_amat_vs_sat": bench_amat_vs_sat(args, device),
        "d_apgd_vs_pgd": bench_apgd(args, device),
        "e_breaking_eps_search": bench_breaking(args, device),
    }
    print(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
