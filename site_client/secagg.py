"""The site's side of secure aggregation and site-level DP clipping, as Flower mods.

Both are run options chosen at the coordinator, so the mods switch themselves
on per message:

- :func:`secagg_mod` runs Flower's ``secaggplus_mod`` when a training message
  belongs to the SecAgg+ protocol. The protocol's messages use Flower's legacy
  record layout (``fitins.*`` / ``fitres.*``); the adapter inside turns them
  into the Message-API layout our train handler and Flower's
  ``fixedclipping_mod`` expect, and turns the reply back, so the update is
  clipped (if asked) *before* it is quantized and masked.
- :func:`clipping_mod` runs Flower's ``fixedclipping_mod`` when the coordinator
  sent a clipping norm (``DifferentialPrivacyClientSideFixedClipping``).

SecAgg+ multiplies each site's model by weight / max-weight and then clips it to
± clipping-range before quantizing; Flower only logs a warning when that clips.
:func:`range_problem` is our check, before training (site_client.task) and on
the update itself (here), so a site refuses instead of sending a distorted model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, FitRes, Parameters, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.protocol import ARRAY_NAMES_KEY, UNIFORM_WEIGHT_KEY
from medfed.settings import ConfigError
from site_client.egress import ARRAYS_KEY, METRICS_KEY

Next = Callable[[Message, Context], Message]

CONFIG_KEY = "config"


class _InnerError(Exception):
    """The train handler answered with an error (a decline, a refusal): pass it out unmasked."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def range_problem(values: Iterable[np.ndarray], weight: float, max_weight: float, clipping_range: float) -> str | None:
    """Why SecAgg+ would distort these values (weighted by ``weight / max_weight``), or None if they fit."""
    ratio = weight / max_weight
    peak = max((float(np.max(np.abs(v))) for v in values if np.size(v)), default=0.0)
    if not np.isfinite(peak):
        return "the model holds NaN or infinite values; secure aggregation cannot carry them"
    if peak * ratio <= clipping_range:
        return None
    return (
        f"secure aggregation would clip this site's model: SecAgg+ scales it by weight {weight:g} / "
        f"secagg-max-weight {max_weight:g} = {ratio:.3g}, which takes its largest value {peak:.3g} to "
        f"{peak * ratio:.3g}, beyond secagg-clipping-range {clipping_range:g}; in the run config set "
        f"secagg-clipping-range to at least {peak * ratio * 1.5:.3g}, or secagg-max-weight to at least "
        f"{math.ceil(weight * peak * 1.5 / clipping_range)}"
    )


def is_secagg(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def legacy_arrays(content: RecordDict) -> ArrayRecord | None:
    """The global model in a SecAgg+ training request, with its names (None for the key-exchange stages)."""
    if "fitins.parameters" not in content.array_records:
        return None
    cfg = content.config_records.get("fitins.config", ConfigRecord())
    names = [str(n) for n in cfg.get(ARRAY_NAMES_KEY, [])]  # type: ignore[union-attr]
    raw = [a.data for k, a in content.array_records["fitins.parameters"].items()]
    if len(names) != len(raw):
        raise ValueError("the SecAgg+ request does not name its arrays; coordinator and site versions differ")
    return ArrayRecord({n: Array(bytes_to_ndarray(b)) for n, b in zip(names, raw, strict=True)})


def _adapter(call_next: Next) -> Next:
    """Legacy FitIns in → Message-API request → handler → Message-API reply → legacy FitRes out."""

    def adapt(msg: Message, ctx: Context) -> Message:
        arrays = legacy_arrays(msg.content)
        if arrays is None:
            raise ValueError("SecAgg+ masked-vector stage without the model; refusing")
        fit_cfg = msg.content.config_records["fitins.config"]
        config = ConfigRecord({k: v for k, v in fit_cfg.items() if k not in (ARRAY_NAMES_KEY, UNIFORM_WEIGHT_KEY)})
        inner = Message(content=RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}), metadata=msg.metadata)
        reply = call_next(inner, ctx)
        if reply.has_error():
            raise _InnerError(reply)
        out = reply.content[ARRAYS_KEY]
        metrics = dict(reply.content[METRICS_KEY])
        weight = 1 if fit_cfg.get(UNIFORM_WEIGHT_KEY, False) else int(metrics.get("num-examples", 1))
        state = ctx.state.config_records.get(RECORD_KEY_STATE, ConfigRecord())
        problem = range_problem((out[n].numpy() for n in arrays), weight,
                                float(state.get("max_weight", 1.0)), float(state.get("clipping_range", 0.0)))
        if problem is not None:  # refuse rather than let Flower clip it with only a warning
            raise ConfigError(f"{problem} (this round's privacy spend stands; nothing was sent)")
        params: Parameters = ndarrays_to_parameters([out[n].numpy() for n in arrays])
        fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=params, num_examples=weight,
                        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    return adapt


def secagg_mod(msg: Message, ctx: Context, call_next: Next) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; everything else passes through."""
    if not is_secagg(msg):
        return call_next(msg, ctx)
    try:
        return secaggplus_mod(msg, ctx, _adapter(call_next))
    except _InnerError as err:
        return Message(error=err.reply.error, reply_to=msg)


def clipping_mod(msg: Message, ctx: Context, call_next: Next) -> Message:
    """Flower's ``fixedclipping_mod`` when the coordinator asks for site-level clipping."""
    if msg.metadata.message_type == MessageType.TRAIN and CONFIG_KEY in msg.content.config_records \
            and KEY_CLIPPING_NORM in msg.content.config_records[CONFIG_KEY]:
        return fixedclipping_mod(msg, ctx, call_next)
    return call_next(msg, ctx)
