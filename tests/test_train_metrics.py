"""The metrics log: a fresh run starts a new file, a resumed one cuts it back to its step."""

import json

from dsv3_jax.train.metrics import MetricsLog, truncate_metrics


def _steps(path):
    return [json.loads(x)["step"] for x in path.read_text().splitlines()]


def test_resume_truncates_to_the_restored_step_and_drops_a_torn_line(tmp_path):
    with MetricsLog(tmp_path, 0) as log:
        for step in range(1, 8):
            log.write({"step": step, "loss": 1.0 / step})
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 8, "lo')  # a run killed mid-write
    assert truncate_metrics(path, 4) == 4
    assert _steps(path) == [1, 2, 3, 4]
    with MetricsLog(tmp_path, 4) as log:  # what a resume from step 4 does
        log.write({"step": 5, "loss": 0.0})
        assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 5]
    with MetricsLog(tmp_path, 0):  # a fresh run in the same folder
        pass
    assert path.read_text() == ""
    assert truncate_metrics(tmp_path / "missing.jsonl", 3) == 0


def _events(folder):
    """Every Event in the TFRecord event files of `folder` (8-byte length, 4-byte CRC, the
    record, 4-byte CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        blob = path.read_bytes()
        at = 0
        while at < len(blob):
            (n,) = struct.unpack("<Q", blob[at:at + 8])
            events.append(Event.FromString(blob[at + 12:at + 12 + n]))
            at += 12 + n + 4
    return events


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    with MetricsLog(tmp_path, 0) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": 10.0 - step, "skipped": 0, "imbalance": [1.5, 2.0],
                       "mfu": None})
    loss = {e.step: v.simple_value for e in _events(tmp_path) for v in e.summary.value
            if v.tag == "loss"}
    assert loss == {1: 9.0, 2: 8.0, 3: 7.0}
    tags = {v.tag for e in _events(tmp_path) for v in e.summary.value}
    assert tags == {"loss", "skipped", "imbalance/0", "imbalance/1"}
