"""Training records as TensorBoard scalars, written with the `tensorboard` package alone.

TensorBoard reads event files: TFRecord-framed `Event` protos. The package that serves them also defines the protos
and the framing, so writing needs neither TensorFlow nor clu's TensorFlow-backed writer, whose import would cost
every training process seconds and hundreds of MiB (measured in docs/benchmarks.md). The file is opened through
etils.epath, so a gs:// workdir gets its event file like a local one (an object store receives it whole when the
run closes it).
"""

from __future__ import annotations

import importlib.util
import socket
import time

from etils import epath

EXTRA = "pip install 'dit-scaling[tensorboard]'"


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class ScalarWriter:
    """Appends scalars to one new event file in `log_dir` (named as TensorBoard's own writers name theirs)."""

    def __init__(self, log_dir: str | epath.Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        log_dir = epath.Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}"
        self._records = RecordWriter(self.path.open("wb"))
        self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        values = [self._summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()]
        self._write(self._event(wall_time=time.time(), step=int(step), summary=self._summary(value=values)))
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()
