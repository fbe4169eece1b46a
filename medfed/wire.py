"""The global model on the wire: one flat float32 array, not one array per tensor.

Flower frames every array of an ArrayRecord as its own content-addressed objects
(object ids, an .npy header: about 440 bytes each), so the default network's 22
small tensors cost 42% on top of their 25 KB of values in every message
(the framing table of `bench/round_overhead.py`). Coordinator and sites build the same
network from the run config, so only the values travel, ordered by tensor name;
the receiver checks the count against its own network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

#: The one array of a model's ArrayRecord.
MODEL_ARRAY = "model"


class WireError(ValueError):
    """An ArrayRecord that is not a model in medfed's wire format, or not this network's."""


def layout(template: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors' names and shapes, in the order their values travel: by name, so that two state
    dicts that list the same tensors in another order still pack alike (sizes alone cannot tell)."""
    return [(name, tuple(template[name].shape)) for name in sorted(template)]


def pack(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """All of ``state``'s values, concatenated in :func:`layout` order, as one float32 array."""
    odd = [f"{name} ({t.dtype})" for name, t in state.items() if t.dtype != torch.float32]
    if odd:
        raise WireError(f"only float32 tensors travel as the model; {', '.join(odd[:3])} are not. "
                        "Keep integer buffers (e.g. BatchNorm's counters) out of the network's state.")
    if not state:
        raise WireError("an empty state has no model to send")
    flat = torch.cat([state[name].detach().reshape(-1).cpu() for name, _ in layout(state)])
    return ArrayRecord({MODEL_ARRAY: Array(flat.numpy())})


def unpack(arrays: ArrayRecord, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict ``pack`` made, cut back into ``template``'s names and shapes."""
    keys = list(arrays.keys())
    if keys != [MODEL_ARRAY]:
        shown = ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
        raise WireError(f"the model arrives as the single array {MODEL_ARRAY!r}, this record holds [{shown}]; "
                        "coordinator and sites must run the same medfed version")
    flat = arrays[MODEL_ARRAY].numpy()
    need = sum(t.numel() for t in template.values())
    if flat.ndim != 1 or flat.dtype != np.float32 or flat.size != need:
        raise WireError(f"the model arrived as {flat.dtype}{list(flat.shape)}; this network needs float32[{need}]. "
                        "Coordinator and sites must use the same run config (image-size) and medfed version.")
    cut: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in layout(template):
        n = int(np.prod(shape, dtype=np.int64))
        cut[name] = torch.from_numpy(flat[offset:offset + n].copy()).reshape(shape)
        offset += n
    return {name: cut[name] for name in template}  # in the template's own order, as load_state_dict lists it


def summarize(arrays: ArrayRecord) -> dict[str, Any]:
    """Each array's name, shape, dtype and bytes as sent, their total, and SHA-256 over (name, bytes) in order.

    The one digest of what crosses the wire: the site's round record, its egress
    guard and the coordinator's receipt all record it, so the three can be matched.
    """
    digest = hashlib.sha256()
    listed: list[dict[str, object]] = []
    for name, arr in arrays.items():
        digest.update(name.encode())
        digest.update(arr.data)
        listed.append({"name": name, "shape": list(arr.shape), "dtype": arr.dtype, "bytes": len(arr.data)})
    return {"arrays": listed, "bytes": sum(int(a["bytes"]) for a in listed), "digest": digest.hexdigest()}
