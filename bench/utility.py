"""What privacy and federation cost in accuracy: AUC per method, on synthetic hospitals.

Four `medfed synth` hospitals: three train (sizes 10:5:2, different scanners and
prevalence), the fourth is held out as an *unseen* site. Every method trains the
consortium's network for the same number of epochs over its data (rounds x
local epochs), with the same optimizer, batch size and per-round learning rate
(the run config's schedule), the optimizer's state kept from round to round:

* local-only, per site, without DP and with DP-SGD at epsilon 8: each site alone;
* pooled (no DP) and pooled DP-SGD at epsilon 8: all three sites' training images in one place
  (what federation tries to approach without moving data);
* FedAvg (no DP): an in-process FedAvg loop (weighted by examples, like Flower's
  FedAvg; each site keeps its Adam state across rounds, as the ClientApp does);
  the ClientApp itself refuses to train without DP, by design;
* FedAvg with record-level DP at epsilon 1, 3 and 8 (delta 1e-5): the real ServerApp and
  ClientApp in Flower's Simulation Engine, each site calibrating its own noise to
  its cap over the run (`calibrate-noise`), its ledger accounting every step.

``--networks scatter-head,densenet121,resnet18`` runs the network column instead:
the scattering head against DenseNet-121 and ResNet-18 (GroupNorm) pretrained
without DP on a separate synthetic "public" hospital (another seed; saved and
pinned by SHA-256 like a study's weights; their AUC on the sites' test images
before any fine-tuning is the "public weights only" column) and fine-tuned (``--net-trainable``,
default the last block) by in-process FedAvg + DP at each ε, against pooled
non-private training of the same network.

AUC is reported on each site's test split, on the pooled test splits, and on all
images of the unseen site. The goal lines compare on the pooled test splits, for
FedAvg + DP on the mean of ``--goal-repeats`` runs at ε = 8: its noise is unseeded,
as at a real site, and one run's AUC moves by several hundredths with the noise alone.

    .venv/bin/python bench/utility.py [--work DIR] [--patients 2000] [--rounds 20]
                                      [--local-epochs 2] [--batch-size 256] [--lr 0.01]
                                      [--goal-repeats 3]
    .venv/bin/python bench/utility.py --networks scatter-head,densenet121,resnet18 [--image-size 64]
                                      [--patients 1000] [--rounds 10] [--public-patients 2000]
                                      [--pretrain-epochs 10] [--pretrain-lr 3e-4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import torch  # noqa: E402
from torch.utils.data import ConcatDataset, Dataset, TensorDataset  # noqa: E402

from medfed import logs  # noqa: E402
from medfed.demo import prepare_sites, simulate  # noqa: E402
from medfed.settings import RunConfig, SiteConfig  # noqa: E402
from models.accounting import calibrate_noise, epsilon  # noqa: E402
from models.dataset import ManifestDataset  # noqa: E402
from models.evaluation import evaluate  # noqa: E402
from models.network import build_model  # noqa: E402
from models.training import LR_SCHEDULES, DPSettings, planned_steps, round_lr, train_local  # noqa: E402

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)
GOAL_EPSILON = 8.0  # the goals are stated at this ε
NOISE_FLOOR = RunConfig().noise_multiplier  # calibration never goes below this sigma
UNSEEN = "unseen"


def prepare(work: Path, patients: int, seed: int) -> tuple[list[SiteConfig], SiteConfig]:
    """Synthesize and de-identify four hospitals; move the fourth out of the federation."""
    marker = work / "prepared.json"
    recipe = {"patients": patients, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        print(f"reusing prepared sites in {work}", flush=True)
    else:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        t = time.monotonic()
        prepare_sites(work, sites=4, patients=patients, seed=seed, epsilon_caps=[8.0] * 4, delta=DELTA,
                      workers=2, progress=False)
        held_out = sorted((work / "sites").iterdir())[-1]
        (work / UNSEEN).mkdir()
        shutil.move(str(held_out), work / UNSEEN / held_out.name)
        marker.write_text(json.dumps(recipe))
        print(f"prepared 4 hospitals in {time.monotonic() - t:.0f}s", flush=True)
    sites = [SiteConfig.from_toml(p / "site.toml") for p in sorted((work / "sites").iterdir())]
    unseen_dir = next((work / UNSEEN).iterdir())
    # the unseen site's paths moved with it: read its store from where it is now
    unseen = SiteConfig.from_toml(unseen_dir / "site.toml").model_copy(update={"data_dir": unseen_dir / "deid"})
    return sites, unseen


def tensors(data_dir: Path, split: str, size: int) -> TensorDataset:
    """A site's split, decoded once (the transforms are the dataset's own)."""
    ds = ManifestDataset(data_dir, split=split, image_size=size)  # type: ignore[arg-type]
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([float(ds[i][1]) for i in range(len(ds))])
    return TensorDataset(xs, ys)


def dp_sigma(n: int, batch: int, epochs: int, eps: float) -> float:
    """Noise multiplier that spends exactly ``eps`` over ``epochs`` epochs (one segment)."""
    steps, q = planned_steps(n, batch, epochs)
    return calibrate_noise((), q, steps, 1, eps, DELTA, "rdp", floor=NOISE_FLOOR)


def train_alone(data: Dataset, args: argparse.Namespace, epochs: int, eps: float | None, seed: int,
                make_model: Callable[[], torch.nn.Module] | None = None) -> torch.nn.Module:
    """One model on one dataset for ``epochs`` epochs, optionally DP-SGD at ``eps``.

    Trained in ``args.rounds`` chunks of ``args.local_epochs`` epochs with the run's
    per-round learning rate and one optimizer state throughout, so it sees exactly
    the schedule a federated site sees; with DP, one σ over all chunks spends ``eps``.
    """
    torch.manual_seed(seed)
    model = make_model() if make_model else build_model(args.image_size)
    dp = None
    if eps is not None:
        dp = DPSettings(dp_sigma(len(data), args.batch_size, epochs, eps), args.max_grad_norm)  # type: ignore[arg-type]
    state: dict = {}
    for rnd in range(1, args.rounds + 1):
        train_local(model, data, epochs=args.local_epochs, batch_size=args.batch_size,
                    lr=round_lr(args.lr, rnd, args.rounds, args.lr_schedule), optimizer=args.optimizer,
                    optimizer_state=state, dp=dp, seed=seed * 10_000 + rnd, **_mode(args))
    return model


def _mode(args: argparse.Namespace) -> dict[str, str]:
    """train_local's grad-sample mode when the bench names one."""
    mode = getattr(args, "grad_sample_mode", None)
    return {"grad_sample_mode": mode} if mode else {}


def fedavg_in_process(train: list[TensorDataset], args: argparse.Namespace, seed: int, eps: float | None = None,
                      after_round: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                      make_model: Callable[[], torch.nn.Module] | None = None) -> torch.nn.Module:
    """FedAvg in one process: each round every site trains from the global model; weighted mean.

    Without ``eps`` it is the table's plain FedAvg. With ``eps`` each site runs DP-SGD
    with one σ calibrated to spend ``eps`` over the whole run, as the ClientApp does
    (same `train_local`, same calibration), but with seeded noise so that recipes can
    be compared draw for draw (`bench/dp_recipe.py`). ``after_round(r, state)`` sees
    each round's global state. ``make_model`` builds the network (default: the default study's).
    """
    make = make_model or (lambda: build_model(args.image_size))
    torch.manual_seed(seed)
    global_state = make().state_dict()
    weights = [len(d) for d in train]
    epochs = args.rounds * args.local_epochs
    dps = [None if eps is None else DPSettings(dp_sigma(len(d), args.batch_size, epochs, eps), args.max_grad_norm)
           for d in train]
    optimizer_states: list[dict] = [{} for _ in train]  # each site keeps its own, as the ClientApp does
    for rnd in range(args.rounds):
        states = []
        for i, data in enumerate(train):
            model = make()
            model.load_state_dict(global_state)
            train_local(model, data, epochs=args.local_epochs, batch_size=args.batch_size,
                        lr=round_lr(args.lr, rnd + 1, args.rounds, args.lr_schedule),
                        optimizer=args.optimizer, optimizer_state=optimizer_states[i], dp=dps[i],
                        seed=seed * 10_000 + rnd * 100 + i, **_mode(args))
            states.append(model.state_dict())
        global_state = {k: sum(w * s[k].float() for w, s in zip(weights, states, strict=True)) / sum(weights)
                        for k in global_state}
        if after_round is not None:
            after_round(rnd + 1, global_state)
    model = make()
    model.load_state_dict(global_state)
    return model


def fedavg_flower(work: Path, sites: list[SiteConfig], args: argparse.Namespace, eps: float,
                  repeat: int = 1) -> tuple[torch.nn.Module, dict]:
    """FedAvg with record-level DP at every site (cap ``eps``), through the real Flower apps."""
    for site in sites:  # each site's cap is its privacy officer's: here the same for all
        capped = site.model_copy(update={"epsilon_cap": eps})
        (site.data_dir.parent / "site.toml").write_text(capped.to_toml())
    out = work / (f"fedavg-dp-eps{eps:g}" + (f"-{repeat}" if repeat > 1 else ""))
    if out.exists():
        shutil.rmtree(out)
    cfg = RunConfig().with_overrides(
        num_server_rounds=args.rounds,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        optimizer=args.optimizer, max_grad_norm=args.max_grad_norm, noise_multiplier=NOISE_FLOOR,
        calibrate_noise=True, keep_optimizer_state=True, image_size=args.image_size, demo_dir=str(work),
        out_dir=str(out),
        min_train_nodes=len(sites), min_evaluate_nodes=len(sites), min_available_nodes=len(sites),
        fraction_evaluate=0.0 if args.no_round_eval else 1.0, seed=args.seed,
        run_name=f"utility-eps{eps:g}-{time.time_ns()}",  # a fresh account in each site's ledger
    )
    simulate(cfg, len(sites))
    model = build_model(args.image_size)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["rounds"][-1]["sites"]
    spent = {"epsilon": [s["train"].get("epsilon") for s in last.values()],
             "noise-multiplier": [s["train"].get("noise-multiplier") for s in last.values()],
             "trained": [sum(1 for r in metrics["rounds"] if r["sites"].get(k, {}).get("status") == "trained")
                         for k in last]}
    return model, spent


#: The network column: the scattering head against two MONAI networks fine-tuned from "public" weights.
NETWORK_COLUMN = ("scatter-head", "densenet121", "resnet18")
#: Pretraining batch on the public set (no DP, so a small batch: more steps per epoch).
PRETRAIN_BATCH = 32
#: Below this AUC on the sites' test images the public weights carry nothing to fine-tune.
PUBLIC_AUC_FLOOR = 0.6


def public_set(work: Path, args: argparse.Namespace) -> TensorDataset:
    """A separate synthetic hospital (another seed), all its images: the "public" data networks are pretrained on."""
    folder = work / "public"
    marker = folder / "prepared.json"
    recipe = {"patients": args.public_patients, "seed": args.seed + 1000, "version": 1}
    if not (marker.exists() and json.loads(marker.read_text()) == recipe):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        prepare_sites(folder, sites=1, patients=args.public_patients, seed=args.seed + 1000, epsilon_caps=[8.0],
                      delta=DELTA, workers=2, progress=False)
        marker.write_text(json.dumps(recipe))
    site = next((folder / "sites").iterdir())
    return tensors(site / "deid", "all", args.image_size)


def pretrain(work: Path, name: str, public: TensorDataset, args: argparse.Namespace) -> tuple[str, str]:
    """Train the whole network on the public set without DP; save it and return (file name, SHA-256).

    This is what a consortium would download once, pin by hash in its study and ship to every site.
    Adam at ``--pretrain-lr`` (3e-4): at 1e-3 the GroupNorm networks trained from scratch collapse to
    a constant output (features identical for every image), which no fine-tuning can recover.
    """
    from models.registry import build_network, file_sha256
    from models.study import Study

    path = work / (f"public-{name}-{args.image_size}px-{args.pretrain_epochs}ep-lr{args.pretrain_lr:g}-"
                   f"{len(public)}.pt")
    if not path.exists():
        t = time.monotonic()
        torch.manual_seed(args.seed)
        model = build_network(Study.model_validate({"image-size": args.image_size, "network": {"name": name}}))
        state: dict = {}
        for epoch in range(1, args.pretrain_epochs + 1):
            out = train_local(model, public, epochs=1, batch_size=PRETRAIN_BATCH, lr=args.pretrain_lr,
                              optimizer="adam", optimizer_state=state, seed=args.seed * 1000 + epoch)
            print(f"  pretraining {name}: epoch {epoch}/{args.pretrain_epochs}, loss {out.loss:.3f} "
                  f"({time.monotonic() - t:.0f}s)", flush=True)
        partial = path.with_suffix(".partial")
        torch.save(model.state_dict(), partial)
        partial.replace(path)  # atomic: a concurrent run never reads a half-written file
        print(f"  pretrained {name} on {len(public)} public images in {time.monotonic() - t:.0f}s", flush=True)
    return path.name, file_sha256(path)


def network_table(work: Path, sites: list[SiteConfig], unseen: SiteConfig, args: argparse.Namespace) -> None:
    """Scattering head vs networks fine-tuned from public weights: pooled non-private, FedAvg + DP per ε.

    FedAvg + DP here is the in-process loop (same `train_local` and σ calibration as the
    ClientApp, seeded noise), since the Flower apps train the run config's network.
    """
    from models.registry import prepare_network
    from models.study import Study

    size, epochs = args.image_size, args.rounds * args.local_epochs
    train = [tensors(s.data_dir, "train", size) for s in sites]
    pooled_train = ConcatDataset(train)  # one object, so a fixed front's features are computed once for it
    evals = {"pooled": ConcatDataset([tensors(s.data_dir, "test", size) for s in sites]),
             UNSEEN: tensors(unseen.data_dir, "all", size)}
    public = public_set(work, args)
    print(f"network column: training images {[len(d) for d in train]}, pooled test {len(evals['pooled'])}, "
          f"unseen {len(evals[UNSEEN])}, public {len(public)}", flush=True)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.networks.split(","):
        t_net = time.monotonic()
        net_args = argparse.Namespace(**vars(args))
        network: dict[str, object] = {"name": name}
        if name != "scatter-head":
            weights, digest = pretrain(work, name, public, args)
            network.update({"weights": weights, "weights-sha256": digest, "trainable": args.net_trainable})
            net_args.lr = args.net_lr
        study = Study.model_validate({"image-size": size, "network": network})

        def make(study: Study = study) -> torch.nn.Module:
            return prepare_network(study, work)

        row = table.setdefault(name, {})

        def score(column: str, model: torch.nn.Module, t: float, row: dict = row, name: str = name) -> None:
            row[column] = {k: float(evaluate(model, d)["auc"]) for k, d in evals.items()}
            print(f"  {name:<14} {column:<22} pooled AUC {row[column]['pooled']:.3f}  unseen "
                  f"{row[column][UNSEEN]:.3f}  ({time.monotonic() - t:.0f}s)", flush=True)

        if name != "scatter-head":
            score("public weights only", make(), time.monotonic())
            if row["public weights only"]["pooled"] < PUBLIC_AUC_FLOOR:
                print(f"  WARNING: {name}'s public weights score {row['public weights only']['pooled']:.3f} on the "
                      f"sites' test images (< {PUBLIC_AUC_FLOOR}): they carry no task to fine-tune; pretrain "
                      "longer, on more public images or at a larger image size", flush=True)
        t = time.monotonic()
        score("pooled, no DP", train_alone(pooled_train, net_args, epochs, None, args.seed, make), t)
        for eps in epsilons:
            t = time.monotonic()
            score(f"FedAvg + DP ε={eps:g}", fedavg_in_process(train, net_args, args.seed, eps=eps, make_model=make), t)
        print(f"  {name}: {time.monotonic() - t_net:.0f}s", flush=True)

    columns = ["public weights only", "pooled, no DP", *[f"FedAvg + DP ε={e:g}" for e in epsilons]]
    print(f"\nAUC on the pooled test splits (unseen site in brackets), {size}x{size}, {args.rounds} rounds x "
          f"{args.local_epochs} local epochs, batch {args.batch_size}, {args.optimizer}; scatter-head lr {args.lr:g}, "
          f"fine-tuned ({args.net_trainable}) lr {args.net_lr:g}, pretrained {args.pretrain_epochs} epochs (Adam lr "
          f"{args.pretrain_lr:g}, batch {PRETRAIN_BATCH}) on {len(public)} public images; delta {DELTA:g}")
    print("| network | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[c]['pooled']:.3f} ({row[c][UNSEEN]:.3f})" if c in row else "-"
                                          for c in columns) + " |")
    goal = f"FedAvg + DP ε={GOAL_EPSILON:g}"
    reference = max(row["pooled, no DP"]["pooled"] for row in table.values())
    for name, row in table.items():
        if name == "scatter-head" or goal not in row:
            continue
        gap = reference - row[goal]["pooled"]
        print(f"goal: {name} at ε={GOAL_EPSILON:g} within 0.03 AUC of the best pooled non-private ({reference:.3f}): "
              f"{row[goal]['pooled']:.3f} (gap {gap:+.3f}) -> {'met' if gap <= 0.03 else 'MISSED'}")
        if "scatter-head" in table:
            above = [f"ε={e:g} {row[c]['pooled']:.3f} vs {table['scatter-head'][c]['pooled']:.3f}"
                     for e in epsilons for c in [f"FedAvg + DP ε={e:g}"]]
            wins = all(row[c]["pooled"] > table["scatter-head"][c]["pooled"]
                       for c in (f"FedAvg + DP ε={e:g}" for e in epsilons))
            print(f"goal: {name} above the scattering head at every ε: {'; '.join(above)} -> "
                  f"{'met' if wins else 'MISSED'}")


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The training recipe's options, defaulting to the run config's: what a consortium gets without tuning."""
    run = RunConfig()
    parser.add_argument("--rounds", type=int, default=run.num_server_rounds)
    parser.add_argument("--local-epochs", type=int, default=run.local_epochs)
    parser.add_argument("--batch-size", type=int, default=run.batch_size)
    parser.add_argument("--lr", type=float, default=run.lr)
    parser.add_argument("--lr-schedule", default=run.lr_schedule, choices=LR_SCHEDULES)
    parser.add_argument("--optimizer", default=run.optimizer, choices=("sgd", "adam"))
    parser.add_argument("--max-grad-norm", type=float, default=run.max_grad_norm)
    parser.add_argument("--image-size", type=int, default=run.image_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one); "
                        "prepared sites are reused when the recipe matches")
    parser.add_argument("--patients", type=int, default=2000, help="patients at the largest site")
    add_recipe_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS))
    parser.add_argument("--goal-repeats", type=int, default=3, help="FedAvg + DP runs at the goal's ε (8): the noise "
                        "is unseeded, as in production, so one run is one draw; the goal is judged on their mean")
    parser.add_argument("--no-round-eval", action="store_true", help="skip per-round federated evaluation (faster)")
    parser.add_argument("--networks", default=None, help="run only the network column, for these registry networks "
                        f"(comma-separated, e.g. {','.join(NETWORK_COLUMN)})")
    parser.add_argument("--public-patients", type=int, default=2000, help="patients of the public pretraining set")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--pretrain-lr", type=float, default=3e-4, help="Adam's rate on the public set (no DP)")
    parser.add_argument("--net-trainable", default="last-block", choices=("last-block", "head", "norm-and-bias", "all"))
    parser.add_argument("--net-lr", type=float, default=0.002, help="learning rate of the fine-tuned networks")
    parser.add_argument("--grad-sample-mode", default=None, help="Opacus mode (default: train_local's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core; on a "
                        "machine shared with other work, 1 is often faster)")
    args = parser.parse_args()
    logs.setup(False)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    t0 = time.monotonic()
    work = (args.work or Path(tempfile.mkdtemp(prefix="medfed-utility-"))).resolve()
    sites, unseen = prepare(work, args.patients, args.seed)
    if args.networks:
        network_table(work, sites, unseen, args)
        print(f"total {time.monotonic() - t0:.0f}s; work folder {work}")
        return
    epochs = args.rounds * args.local_epochs
    size = args.image_size

    train = [tensors(s.data_dir, "train", size) for s in sites]
    tests = {s.name: tensors(s.data_dir, "test", size) for s in sites}
    evals: dict[str, Dataset] = dict(tests)
    evals["pooled"] = ConcatDataset(list(tests.values()))
    evals[UNSEEN] = tensors(unseen.data_dir, "all", size)
    print("training images " + ", ".join(f"{s.name} {len(d)}" for s, d in zip(sites, train, strict=True))
          + f"; test {', '.join(f'{k} {len(v)}' for k, v in evals.items())}", flush=True)

    rows: list[tuple[str, str, dict[str, float], float]] = []

    def score(method: str, eps: str, model: torch.nn.Module, t: float) -> dict[str, float]:
        aucs = {k: float(evaluate(model, d)["auc"]) for k, d in evals.items()}
        rows.append((method, eps, aucs, time.monotonic() - t))
        print(f"  {method:<24} eps {eps:>4}  pooled AUC {aucs['pooled']:.3f}  unseen {aucs[UNSEEN]:.3f}  "
              f"({time.monotonic() - t:.0f}s)", flush=True)
        return aucs

    local_rows = []
    for s, data in zip(sites, train, strict=True):
        t = time.monotonic()
        local_rows.append(score(f"local-only {s.name}", "-", train_alone(data, args, epochs, None, args.seed), t))
    local_dp_rows = []
    for s, data in zip(sites, train, strict=True):
        t = time.monotonic()
        local_dp_rows.append(score(f"local-only DP {s.name}", "8", train_alone(data, args, epochs, 8.0, args.seed), t))
    t = time.monotonic()
    pooled = score("pooled", "-", train_alone(ConcatDataset(train), args, epochs, None, args.seed), t)
    t = time.monotonic()
    pooled_dp = score("pooled DP", "8", train_alone(ConcatDataset(train), args, epochs, 8.0, args.seed), t)
    t = time.monotonic()
    score("FedAvg", "-", fedavg_in_process(train, args, args.seed), t)
    fed: dict[float, list[dict[str, float]]] = {}
    spends: dict[str, dict] = {}
    for eps in (float(e) for e in args.epsilons.split(",")):
        repeats = max(1, args.goal_repeats) if eps == GOAL_EPSILON else 1
        for i in range(repeats):
            t = time.monotonic()
            model, spent = fedavg_flower(work, sites, args, eps, i + 1)
            label = f"{eps:g}" if repeats == 1 else f"{eps:g} #{i + 1}"
            fed.setdefault(eps, []).append(score("FedAvg + DP (Flower)", label, model, t))
            spends[label] = spent

    cols = [s.name for s in sites] + ["pooled", UNSEEN]
    print()
    print(f"AUC, {len(sites)} sites + 1 unseen, {args.patients} patients at the largest site, {size}x{size}, "
          f"{args.rounds} rounds x {args.local_epochs} local epochs (= {epochs} epochs everywhere), batch "
          f"{args.batch_size}, {args.optimizer} lr {args.lr:g} ({args.lr_schedule} over the rounds), "
          f"clip {args.max_grad_norm:g}, delta {DELTA:g}")
    print("| method | ε | " + " | ".join(cols) + " | seconds |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    for method, eps, aucs, secs in rows:
        print(f"| {method} | {eps} | " + " | ".join(f"{aucs[c]:.3f}" for c in cols) + f" | {secs:.0f} |")
    mean_local = statistics.mean(r["pooled"] for r in local_rows)
    summaries = [("local-only, mean of sites", "-", local_rows), ("local-only DP, mean of sites", "8", local_dp_rows)]
    if len(fed.get(GOAL_EPSILON, [])) > 1:
        summaries.append((f"FedAvg + DP (Flower), mean of {len(fed[GOAL_EPSILON])} runs", f"{GOAL_EPSILON:g}",
                          fed[GOAL_EPSILON]))
    for label, eps_label, group in summaries:
        print(f"| {label} | {eps_label} | " + " | ".join(
            f"{statistics.mean(r[c] for r in group):.3f}" for c in cols) + " | |")
    for eps, spent in spends.items():
        print(f"FedAvg + DP at ε={eps}: sites' ε spent {[round(e, 3) for e in spent['epsilon'] if e is not None]}, "
              f"σ of the last round {[round(s, 3) for s in spent['noise-multiplier'] if s is not None]}, "
              f"rounds trained {spent['trained']}")
    n_pooled = sum(len(d) for d in train)
    steps, q = planned_steps(n_pooled, args.batch_size, epochs)
    sigma = dp_sigma(n_pooled, args.batch_size, epochs, 8.0)
    print(f"pooled DP: σ {sigma:.3f}, q {q:.4f}, {steps} steps, ε {epsilon(q, sigma, steps, DELTA):.3f}")
    if GOAL_EPSILON in fed:
        runs = [r["pooled"] for r in fed[GOAL_EPSILON]]
        fed_auc = statistics.mean(runs)
        spread = (f" (mean of {len(runs)} runs: {', '.join(f'{r:.3f}' for r in runs)}; "
                  f"sd {statistics.stdev(runs):.3f})" if len(runs) > 1 else "")
        gap = pooled["pooled"] - fed_auc
        print(f"goal: FedAvg+DP ε=8 within 0.03 AUC of pooled non-private: {fed_auc:.3f}{spread} vs "
              f"{pooled['pooled']:.3f} (gap {gap:+.3f}) -> {'met' if gap <= 0.03 else 'MISSED'}")
        print(f"goal: FedAvg+DP ε=8 above the mean local-only AUC: {fed_auc:.3f} vs {mean_local:.3f} -> "
              f"{'met' if fed_auc > mean_local else 'MISSED'}")
    print(f"pooled DP ε=8 vs pooled: {pooled_dp['pooled']:.3f} vs {pooled['pooled']:.3f}")
    print(f"total {time.monotonic() - t0:.0f}s; work folder {work}")


if __name__ == "__main__":
    main()
