"""`medfed privacy ...`: price a DP-SGD run, plan its noise, read a site's ledger, audit a trained model.

Kept apart from the other commands; the heavy imports (Opacus, torch) happen inside
the commands. ``epsilon``, ``plan`` and ``ledger`` print their answer as the last
line so that scripts can read it with ``tail -1``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from medfed.cli.output import fail
from medfed.settings import RunConfig

privacy_app = typer.Typer(
    help="Record-level differential privacy: compute ε, plan the noise for a target ε, "
    "audit a model with membership-inference attacks.",
    no_args_is_help=True,
)


class Accountant(StrEnum):
    rdp = "rdp"
    prv = "prv"


class ShadowOptimizer(StrEnum):
    adam = "adam"
    sgd = "sgd"


_ACCOUNTANT = Annotated[Accountant, typer.Option(help="Privacy accountant (Opacus): PRV (tight) or RDP.")]
#: The CLI prices as a run does by default.
_DEFAULT_ACCOUNTANT = Accountant(RunConfig.model_fields["accountant"].default)
LEDGER_FILE = "privacy-ledger.sqlite"
_DELTA = Annotated[float, typer.Option("--delta", help="δ; must be below 1/n for a dataset of n records.")]



@privacy_app.command("epsilon")
def epsilon_cmd(
    sample_rate: Annotated[float, typer.Option("--sample-rate", help="q: expected batch / dataset size.")],
    noise_multiplier: Annotated[float, typer.Option("--noise-multiplier", help="σ: noise std / clip norm.")],
    steps: Annotated[int, typer.Option("--steps", help="T: DP-SGD steps in all (every round).")],
    delta: _DELTA,
    accountant: _ACCOUNTANT = _DEFAULT_ACCOUNTANT,
) -> None:
    """ε of T DP-SGD steps at sampling rate q and noise multiplier σ (printed as the last line)."""
    from models.accounting import AccountingError, epsilon

    try:
        eps = epsilon(sample_rate, noise_multiplier, steps, delta, accountant.value)
    except AccountingError as err:
        fail(str(err))
    typer.echo(f"q={sample_rate:g} sigma={noise_multiplier:g} steps={steps} delta={delta:g} "
               f"accountant={accountant.value}")
    typer.echo(f"{eps:.6g}")


@privacy_app.command("plan")
def plan_cmd(
    epsilon: Annotated[float, typer.Option("--epsilon", help="Target ε for the whole run.")],
    delta: _DELTA,
    dataset_size: Annotated[int, typer.Option("--dataset-size", help="n: training records at the site.")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Expected batch size B.")],
    rounds: Annotated[int, typer.Option("--rounds", help="Federated rounds R the site trains in.")],
    local_epochs: Annotated[int, typer.Option("--local-epochs", help="Local epochs L per round.")],
    accountant: _ACCOUNTANT = _DEFAULT_ACCOUNTANT,
) -> None:
    """The smallest noise multiplier that keeps R rounds of L local epochs within ε, and the ε it gives."""
    from models.accounting import AccountingError, plan

    try:
        p = plan(epsilon, delta, dataset_size, batch_size, rounds, local_epochs, accountant.value)
    except AccountingError as err:
        fail(str(err))
    typer.echo(f"q={p.sample_rate:.6g} steps/round={p.steps_per_round} rounds={p.rounds} steps={p.steps} "
               f"delta={delta:g} accountant={p.accountant}")
    typer.echo(f"noise-multiplier {p.noise_multiplier:g} epsilon {p.epsilon:.4f}")


@privacy_app.command("ledger")
def ledger_cmd(
    kit_or_state: Annotated[Path, typer.Argument(
        help="A site kit folder (with site.toml, written by `medfed site start`) or a site's state folder "
        f"(with {LEDGER_FILE}).")],
) -> None:
    """What the site has spent: one row per run, then the lifetime ε against the site's cap (last line)."""
    from medfed.settings import ConfigError, SiteConfig
    from site_client.ledger import LEGACY_ACCOUNTANT, PrivacyLedger

    folder = kit_or_state
    if not folder.is_dir():
        fail(f"{folder} is not a folder; pass a site kit folder (with site.toml) or a site's state folder "
              f"(with {LEDGER_FILE})")
    site: SiteConfig | None = None
    if (folder / "site.toml").is_file():
        try:
            site = SiteConfig.from_toml(folder / "site.toml")
        except ConfigError as err:
            fail(str(err))
        state = site.state_dir
    elif (folder / LEDGER_FILE).is_file():
        state = folder
    elif (folder / "kit.toml").is_file():
        fail(f"{folder} is a site kit without site.toml: start the site once (`medfed site start {folder} --data "
              "DEID_DIR`) so it writes site.toml, or pass the site's state folder")
    else:
        fail(f"{folder} holds neither site.toml (a site kit) nor {LEDGER_FILE} (a site's state folder); pass one "
              "of those")
    path = state / LEDGER_FILE
    if not path.is_file():
        fail(f"{path} does not exist: this site has not taken part in a run yet (nothing spent)")
    ledger = PrivacyLedger(path)
    policy = ledger.policy()
    if site is not None:
        cap, delta = site.epsilon_cap, site.delta
    elif policy is not None:
        cap, delta = policy["epsilon_cap"], policy["delta"]
    else:
        fail(f"{path} records no lifetime cap (written by an older site); pass the site's kit folder instead, "
              "whose site.toml holds epsilon-cap and delta")
    accountant = policy["accountant"] if policy is not None else LEGACY_ACCOUNTANT
    rows = ledger.summary(delta)
    typer.echo(f"{'run':<28} {'accountant':<10} {'spent':>5} {'declined':>8} {'evaluations':>11} {'epsilon':>9}")
    for r in rows:
        declined = r["evaluations_declined"]
        evals = f"{r['evaluations']}" + (f" (+{declined} declined)" if declined else "")
        typer.echo(f"{r['run']:<28} {r['accountant']:<10} {r['spent']:>5} {r['declined']:>8} {evals:>11} "
                   f"{r['epsilon']:>9.3f}")
    lifetime = ledger.lifetime_epsilon(delta, accountant)
    typer.echo(f"lifetime ε {lifetime:.3f} of cap {cap:g} (δ {delta:g})")


@privacy_app.command("audit")
def audit_cmd(
    model: Annotated[Path, typer.Argument(help="model.pt: a state dict of the consortium model.")],
    members: Annotated[Path, typer.Option("--members", help="De-identified store of training records.")],
    non_members: Annotated[Path, typer.Option("--non-members", help="De-identified store of records not trained on.")],
    image_size: Annotated[int, typer.Option(help="Image size the model was trained at.")] = 64,
    shadows: Annotated[int, typer.Option(min=0, help="LiRA shadow models (0: loss-threshold attack only).")] = 8,
    shadow_epochs: Annotated[int, typer.Option(min=1, help="Shadow training: epochs (match the target's).")] = 10,
    shadow_batch_size: Annotated[int, typer.Option(min=1, help="Shadow training: batch size.")] = 32,
    shadow_lr: Annotated[float, typer.Option(help="Shadow training: learning rate.")] = 0.01,
    shadow_optimizer: Annotated[ShadowOptimizer, typer.Option(
        help="Shadow training: the optimizer (match the target's).")] = ShadowOptimizer.adam,
    shadow_noise_multiplier: Annotated[float, typer.Option(
        help="Shadow training: DP-SGD noise multiplier (0: no DP, the strongest shadows).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the shadows' data split and training.")] = 0,
) -> None:
    """Membership inference on MODEL: loss threshold and LiRA; attack AUC and TPR at 1% FPR."""
    import torch

    from models.dataset import DatasetError, ManifestDataset
    from models.membership import lira_attack, loss_threshold_attack
    from models.network import build_model
    from models.training import DPSettings, train_local

    if members.resolve() == non_members.resolve():
        fail("--members and --non-members are the same store; pass two disjoint stores")
    try:
        state = torch.load(model, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"{model} does not exist; pass the model.pt a run wrote")
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        fail(f"{model} is not a saved state dict ({type(err).__name__}); pass the model.pt a run wrote")
    target = build_model(image_size)
    try:
        target.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        fail(f"{model} does not fit the consortium model: {str(err).splitlines()[0]}")
    try:
        member_ds = ManifestDataset(members, split="all", image_size=image_size)
        non_member_ds = ManifestDataset(non_members, split="all", image_size=image_size)
    except DatasetError as err:
        fail(str(err))

    results = [loss_threshold_attack(target, member_ds, non_member_ds)]
    if shadows:
        if shadows < 2:
            fail("LiRA needs at least 2 shadow models; pass --shadows 0 or >= 2")

        def train_shadow(ds, shadow_seed: int) -> torch.nn.Module:
            torch.manual_seed(shadow_seed)
            shadow = build_model(image_size)
            dp = DPSettings(shadow_noise_multiplier, 1.0) if shadow_noise_multiplier > 0 else None
            train_local(shadow, ds, epochs=shadow_epochs, batch_size=shadow_batch_size, lr=shadow_lr, dp=dp,
                        optimizer=shadow_optimizer.value, seed=shadow_seed)
            return shadow

        results.append(lira_attack(target, member_ds, non_member_ds, train_shadow, num_shadows=shadows, seed=seed))
    typer.echo(f"members={len(member_ds)} non-members={len(non_member_ds)}")
    for r in results:
        typer.echo(f"{r.attack}: AUC {r.auc:.4f}  TPR@1%FPR {r.tpr_at_low_fpr:.4f}")
