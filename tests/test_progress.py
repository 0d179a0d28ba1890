"""Progress in logs: a bar only on a terminal; elsewhere plain lines at an interval, TQDM_* honoured."""
from __future__ import annotations

import io

from guided_concepts import train
from guided_concepts.progress import Progress
from tests.test_training import args


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run(progress: Progress, clock: Clock, steps: int, seconds_per_step: float) -> None:
    for step in range(1, steps + 1):
        clock.now += seconds_per_step
        progress.update(step, loss=1.0 / step, lr=1e-4)
    progress.close()


def test_a_log_gets_a_line_every_interval_with_rate_and_eta(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    stream, clock = io.StringIO(), Clock()
    run(Progress(100, stream=stream, every_seconds=10.0, clock=clock), clock, 100, 0.5)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(" | ")[0] for line in lines] == [f"train step {s}/100" for s in (20, 40, 60, 80, 100)]
    assert lines[0] == "train step 20/100 | loss 0.0500 | lr 1.0e-04 | 0.500 s/step | ETA 0:00:40"
    stream, clock = io.StringIO(), Clock()
    run(Progress(100, stream=stream, every_steps=25, every_seconds=1e9, clock=clock), clock, 100, 0.5)
    assert len(stream.getvalue().splitlines()) == 4


def test_tqdm_environment_variables_are_honoured(monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "25")
    stream, clock = io.StringIO(), Clock()
    run(Progress(100, stream=stream, every_seconds=10.0, clock=clock), clock, 100, 0.5)
    assert len(stream.getvalue().splitlines()) == 2                   # at 50 s and 100 s, not every 10 s
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for stream in (io.StringIO(), Terminal()):
        clock = Clock()
        run(Progress(100, stream=stream, clock=clock), clock, 100, 0.5)
        assert stream.getvalue() == ""


def test_a_terminal_gets_the_bar(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    stream, clock = Terminal(), Clock()
    run(Progress(10, stream=stream, clock=clock), clock, 10, 0.5)
    assert "\r" in stream.getvalue() and "10/10" in stream.getvalue() and "train step" not in stream.getvalue()


def test_train_py_writes_plain_lines_when_its_output_is_not_a_terminal(tmp_path, tiny_model_dir, chairs_dir, capfd,
                                                                       monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    train.main(args(tmp_path, "log"))
    err = capfd.readouterr().err
    assert "train step 4/4 | loss " in err and "\r" not in err
