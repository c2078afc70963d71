"""Library noise off the console. What transformers, DeepSpeed, bitsandbytes, accelerate, peft, torch and
Python's warnings say goes to the run's log, OUT/crb.log (held in memory until the run knows OUT; other
processes than the first write crb.rankN.log); crb's own lines and warnings stay on the console.
CRB_DEBUG=1 (`crb --debug`) leaves the console as the libraries set it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

from crb.errors import CrbWarning

LIBRARIES = ("transformers", "DeepSpeed", "deepspeed", "bitsandbytes", "accelerate", "peft", "torch", "datasets",
             "sentence_transformers", "liger_kernel", "huggingface_hub", "trl")
FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


class RunLog(logging.Handler):
    """Holds records until the run's folder is known, then writes them (and all later ones) to a file there."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        elif len(self.held) < 10_000:
            self.held.append(record)

    def attach(self, path: Path) -> None:
        if self.file is not None:
            self.file.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(logging.Formatter(FORMAT))
        for record in self.held:
            self.file.emit(record)
        self.held.clear()


LOG = RunLog()


def _to_log(record: logging.LogRecord) -> bool:
    """A logger filter: the record goes to the run's log, never to a console handler (DeepSpeed adds its own
    stdout handler when it is imported, after this filter is in place)."""
    LOG.handle(record)
    return False


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, CrbWarning):
        print(f"crb: warning: {message}", file=sys.stderr)
    else:
        LOG.handle(logging.makeLogRecord({"name": "py.warnings", "levelname": "WARNING", "levelno": logging.WARNING,
                                          "msg": warnings.formatwarning(message, category, filename, lineno, line)}))


def quiet() -> None:
    """Route the libraries' log records and warnings to the run's log (idempotent)."""
    if os.environ.get("CRB_DEBUG") == "1":
        return
    warnings.showwarning = _show_warning
    for name in LIBRARIES:
        log = logging.getLogger(name)
        if _to_log not in log.filters:  # records logged on the library's own logger (DeepSpeed's)
            log.addFilter(_to_log)
        if LOG not in log.handlers:  # records of its child loggers (bitsandbytes.backends.cpu.ops, ...)
            log.addHandler(LOG)
        log.propagate = False
        for h in list(log.handlers):  # console handlers the library installed before now
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr):
                log.removeHandler(h)


def attach(out: Path, rank: int) -> None:
    """From now on (and what was held so far) into OUT/crb.log. A folder that cannot be written is left to
    the run's own check (one line naming output.dir); the records stay held meanwhile."""
    if os.environ.get("CRB_DEBUG") != "1":
        with contextlib.suppress(OSError):
            LOG.attach(out / ("crb.log" if rank == 0 else f"crb.rank{rank}.log"))
