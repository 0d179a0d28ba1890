"""Training progress: a tqdm bar on a terminal; in a log file or CI, one plain line now and then.

A bar redrawn ten times a second fills a log with carriage returns. When the stream is not a
terminal, `Progress` prints `step 120/400 | loss 0.0812 | lr 1.0e-04 | 0.153 s/step | ETA 0:00:43`
every `every_steps` steps or `every_seconds` seconds, whichever comes first, and at the end.
TQDM_DISABLE=1 silences both; TQDM_MININTERVAL (seconds) sets the plain lines' interval too.
"""
from __future__ import annotations

import datetime
import os
import sys
import time

from tqdm import tqdm


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class Progress:
    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True, stream=None,
                 every_steps: int = 0, every_seconds: float = 30.0, clock=time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.step, self.desc, self.clock = total, initial, desc, clock
        self.enabled = enabled and not _env_true("TQDM_DISABLE")
        try:                    # tqdm's own variable; a value that is not a number is ignored
            self.every_seconds = float(os.environ.get("TQDM_MININTERVAL") or every_seconds)
        except ValueError:
            self.every_seconds = every_seconds
        self.every_steps = every_steps
        terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream) if terminal and self.enabled else None
        self.start_step, self.started = initial, clock()
        self.last_step, self.last_time = initial, self.started
        self.loss: float | None = None
        self.lr: float | None = None

    def update(self, step: int, loss: float | None = None, lr: float | None = None) -> None:
        """The loop reached `step` (the last step's loss and lr, for the line)."""
        if self.bar is not None:
            self.bar.update(step - self.step)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")
        self.step, self.loss, self.lr = step, loss, lr
        if self.bar is None and self.enabled:
            now = self.clock()
            due_steps = self.every_steps and step - self.last_step >= self.every_steps
            if due_steps or now - self.last_time >= self.every_seconds or step >= self.total:
                self.write_line(now)

    def line(self, now: float) -> str:
        done = self.step - self.start_step
        per_step = (now - self.started) / done if done > 0 else float("nan")
        parts = [f"{self.desc} step {self.step}/{self.total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.1e}")
        if done > 0:
            eta = datetime.timedelta(seconds=round(per_step * (self.total - self.step)))
            parts += [f"{per_step:.3f} s/step", f"ETA {eta}"]
        return " | ".join(parts)

    def write_line(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self.last_step, self.last_time = self.step, now

    def write(self, text: str) -> None:
        """A message between updates (above the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.step != self.last_step:
            self.write_line(self.clock())
