"""The run's metrics log: one JSON record per step in OUT/metrics.jsonl, and the same scalars
as TensorBoard event files next to it (`tensorboard --logdir OUT` watches a run live).

A run that starts at step 0 starts a new file; a resumed run first cuts the file back to the
restored step (the steps logged after the last checkpoint are run again and logged again), so
the file and the plot hold each step once. TensorBoard gets the same: a resumed writer purges
the events past the restored step (tensorboardX's `purge_step`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of steps <= `step` in the JSON-lines file `path` (a torn last line, as
    a killed run can leave, is dropped too); returns how many records were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of a record: its numbers, and lists (per MoE layer) by index."""
    out = {}
    for key, value in record.items():
        if key == "step" or value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, list):
            out.update({f"{key}/{i}": float(v) for i, v in enumerate(value)})
    return out


class MetricsLog:
    """Appends step records to OUT/metrics.jsonl (flushed each write) and OUT's TensorBoard
    event file. Open it with the run's first step: 0 starts a fresh file, a resumed step
    truncates the old one to it."""

    def __init__(self, out: Path, start: int):
        from tensorboardX import SummaryWriter

        self.path = Path(out) / "metrics.jsonl"
        if start == 0:
            self.path.unlink(missing_ok=True)
        else:
            truncate_metrics(self.path, start)
        self.file = open(self.path, "a")
        self.board = SummaryWriter(logdir=str(out), purge_step=start + 1 if start else None,
                                   flush_secs=10)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in scalars(record).items():
            self.board.add_scalar(key, value, record["step"])

    def records(self) -> list[dict]:
        """Every record in the file (this run's and, after a resume, the earlier ones)."""
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def close(self) -> None:
        self.file.close()
        self.board.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
