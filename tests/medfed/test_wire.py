"""The model's wire format: one flat float32 array that cuts back into the network's tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from coordinator.federation import initial_state
from coordinator.receipts import wire_bytes
from medfed.settings import RunConfig
from medfed.wire import MODEL_ARRAY, WireError, layout, pack, unpack


def _state() -> dict[str, torch.Tensor]:
    return initial_state(RunConfig().with_overrides(image_size=32, seed=1))


def test_pack_then_unpack_gives_back_every_tensor_exactly() -> None:
    state = _state()
    packed = pack(state)
    assert list(packed.keys()) == [MODEL_ARRAY]
    assert packed[MODEL_ARRAY].shape == (sum(t.numel() for t in state.values()),)
    back = unpack(packed, state)
    assert list(back) == list(state)  # names in the state dict's order
    for name, tensor in state.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], tensor), name


def test_values_travel_by_tensor_name_whatever_order_a_dict_lists_them() -> None:
    state = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([[3.0], [4.0]])}
    assert pack(state)[MODEL_ARRAY].numpy().tolist() == [3.0, 4.0, 1.0, 2.0]
    assert layout(state) == [("a", (2, 1)), ("b", (2,))]
    # a receiver whose network lists the tensors in another order cuts them right
    back = unpack(pack(state), {"b": torch.zeros(2), "a": torch.zeros(2, 1)})
    assert list(back) == ["b", "a"] and back["a"].tolist() == [[3.0], [4.0]] and back["b"].tolist() == [1.0, 2.0]
    swapped = unpack(pack({"a": state["a"], "b": state["b"]}), state)
    assert all(torch.equal(swapped[k], state[k]) for k in state)


def test_a_record_in_another_format_or_of_another_network_is_refused_with_what_to_do() -> None:
    state = _state()
    per_tensor = ArrayRecord(state)  # Flower's default layout: one array per tensor
    with pytest.raises(WireError, match="single array 'model'.*same medfed version"):
        unpack(per_tensor, state)
    with pytest.raises(WireError, match=r"needs float32\[3\].*run config") as err:
        unpack(pack(state), {"w": torch.zeros(3)})  # a network of another size
    assert f"[{sum(t.numel() for t in state.values())}]" in str(err.value)
    doubles = ArrayRecord({MODEL_ARRAY: Array(np.zeros(3, dtype=np.float64))})
    with pytest.raises(WireError, match="float64"):
        unpack(doubles, {"w": torch.zeros(3)})


def test_only_float32_tensors_are_packed() -> None:
    with pytest.raises(WireError, match="num_batches_tracked"):
        pack({"w": torch.zeros(2), "num_batches_tracked": torch.tensor(3)})
    with pytest.raises(WireError, match="empty"):
        pack({})


def test_the_packed_reply_is_within_a_tenth_of_the_model_on_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the format exists: Flower frames each array separately; one array keeps framing small."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    state = initial_state(RunConfig())
    model_bytes = sum(t.numel() * 4 for t in state.values())
    metrics = MetricRecord({"num-examples": 100, "epsilon": 1.0, "sample-rate": 0.5})

    def reply_bytes(arrays: ArrayRecord) -> int:
        return wire_bytes(Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), dst_node_id=2,
                                  message_type="train"))

    assert reply_bytes(pack(state)) <= 1.1 * model_bytes
    assert reply_bytes(ArrayRecord(state)) > 1.1 * model_bytes  # the per-tensor layout is not


def test_site_egress_and_coordinator_record_the_same_digest_of_an_update() -> None:
    """One digest links a site's round record, its egress record and the coordinator's receipt."""
    import hashlib

    from anonymization.audit.anchors import anchor_fields
    from coordinator.receipts import arrays_digest
    from site_client.egress import check_reply
    from site_client.task import update_summary

    state = initial_state(RunConfig().with_overrides(image_size=32))
    record = pack(state)
    flat = record[MODEL_ARRAY]
    expected = hashlib.sha256(MODEL_ARRAY.encode() + flat.data).hexdigest()
    summary = update_summary(state)
    assert summary["digest"] == expected and summary["bytes"] == len(flat.data) > 4 * flat.numpy().size  # .npy framing
    assert summary["arrays"] == [{"name": MODEL_ARRAY, "shape": list(flat.shape), "dtype": flat.dtype,
                                  "bytes": len(flat.data)}]
    assert arrays_digest(record) == expected
    reply = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 3}),
                        "audit": ConfigRecord(anchor_fields("hospital-a", 1, "0" * 64))})
    assert check_reply(reply, "train", record).digest == expected
    state["classifier.head.bias"] = state["classifier.head.bias"] + 1.0  # another update, another digest
    assert update_summary(state)["digest"] != expected
