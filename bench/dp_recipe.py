"""Compare training recipes for FedAvg with record-level DP, draw for draw.

`bench/utility.py` runs the real Flower apps, whose noise is unseeded, so two
recipes there differ by the recipe *and* by the noise. This runs the same loop in
one process (`utility.fedavg_in_process`: `train_local` per site, σ calibrated per
site to spend ε over the run, weighted mean) with seeded noise, for several seeds,
so a change of learning rate, optimizer, clipping norm, schedule or rounds is
judged on the same draws. It also scores an exponential moving average of the
global models (post-processing of released models, so free under DP) and, once,
pooled non-private training with the same recipe: the utility goal's reference.

    .venv/bin/python bench/dp_recipe.py --work /tmp/utilwork [--seeds 0,1,2] [--epsilon 8]
        [--rounds 20] [--local-epochs 2] [--lr 0.01] [--optimizer adam] [--max-grad-norm 1]
        [--lr-schedule constant] [--ema 0.8] [--no-pooled]

The sites are `utility.py`'s (same `--work` and `--patients` reuse them).
Last line: mean pooled-test AUC over the seeds and its gap to pooled non-private.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils.data import ConcatDataset  # noqa: E402
from utility import add_recipe_args, fedavg_in_process, prepare, tensors, train_alone  # noqa: E402

from medfed import logs  # noqa: E402
from models.evaluation import evaluate  # noqa: E402
from models.network import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="utility.py's working folder (prepared if missing)")
    parser.add_argument("--patients", type=int, default=2000)
    add_recipe_args(parser)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ema", type=float, default=0.8, help="decay of the moving average of global models")
    parser.add_argument("--no-pooled", action="store_true", help="skip the pooled non-private reference")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    args = parser.parse_args()
    if not 0.0 <= args.ema < 1.0:
        parser.error(f"--ema must be in [0, 1) (got {args.ema})")
    logs.setup(False)
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    sites, _ = prepare(args.work.resolve(), args.patients, 0)
    train = [tensors(s.data_dir, "train", args.image_size) for s in sites]
    test = ConcatDataset([tensors(s.data_dir, "test", args.image_size) for s in sites])

    def auc(state: dict[str, torch.Tensor]) -> float:
        model = build_model(args.image_size)
        model.load_state_dict(state)
        return float(evaluate(model, test)["auc"])

    print(f"recipe: {args.optimizer} lr {args.lr:g} ({args.lr_schedule}), clip {args.max_grad_norm:g}, "
          f"{args.rounds} rounds x {args.local_epochs} local epochs, batch {args.batch_size}, ε {args.epsilon:g}",
          flush=True)
    finals, averaged = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        t = time.monotonic()
        curve: list[str] = []
        ema: dict[str, dict[str, torch.Tensor]] = {}

        def after_round(rnd: int, state: dict[str, torch.Tensor]) -> None:
            prev = ema.get("state")  # noqa: B023 - called within this iteration only
            ema["state"] = ({k: v.clone() for k, v in state.items()} if prev is None else  # noqa: B023
                            {k: args.ema * prev[k] + (1 - args.ema) * state[k] for k in state})
            if rnd % 5 == 0 or rnd == args.rounds:
                curve.append(f"r{rnd} {auc(state):.3f}")  # noqa: B023 - called within this iteration only

        model = fedavg_in_process(train, args, seed, eps=args.epsilon, after_round=after_round)
        finals.append(auc(model.state_dict()))
        averaged.append(auc(ema["state"]))
        print(f"  seed {seed}: AUC {finals[-1]:.3f}, EMA {args.ema:g} {averaged[-1]:.3f}; {', '.join(curve)} "
              f"({time.monotonic() - t:.0f}s)", flush=True)
    mean = statistics.mean(finals)
    sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
    print(f"mean over {len(finals)} seeds: {mean:.3f} (sd {sd:.3f}); EMA {statistics.mean(averaged):.3f}")
    line = f"FedAvg + DP ε={args.epsilon:g}, in process: mean AUC {mean:.3f}"
    if not args.no_pooled:
        pooled = float(evaluate(train_alone(ConcatDataset(train), args, args.rounds * args.local_epochs, None, 0),
                                test)["auc"])
        line += f", pooled non-private {pooled:.3f}, gap {pooled - mean:+.3f}"
    print(f"total {time.monotonic() - t0:.0f}s")
    print(line)


if __name__ == "__main__":
    main()
