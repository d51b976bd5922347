"""selfboottok.progress: log lines at a steady interval off a terminal, a bar on one."""

import io

from selfboottok.progress import Progress, track


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_one_line_per_5_percent():
    out = io.StringIO()
    with Progress(1000, "train", unit="step", stream=out) as p:
        for step in range(1000):
            p.set_postfix({"loss": 1.0 / (step + 1)})
            p.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 and "\r" not in out.getvalue()
    assert lines[0].startswith("train: 50/1000 step (5%)") and lines[-1].startswith("train: 1000/1000 step (100%)")
    assert "loss=0.001" in lines[-1]


def test_time_interval_and_last_count():
    out = io.StringIO()
    items = list(track(iter(range(7)), "tokenize", stream=out, seconds=0.0))
    assert items == list(range(7))
    lines = out.getvalue().splitlines()
    assert len(lines) == 7 and lines[-1].startswith("tokenize: 7 it")  # unknown total: time only
    out = io.StringIO()
    with Progress(10, "x", stream=out, every=0.5) as p:
        p.update(3)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]  # close logs the last count
    assert out.getvalue().startswith("x: 3/10 it (30%)")


def test_resumed_count_and_disabled():
    out = io.StringIO()
    with Progress(100, "s", initial=90, stream=out) as p:
        for _ in range(10):
            p.update()
    assert len(out.getvalue().splitlines()) == 2  # 95 and 100
    quiet = io.StringIO()
    with Progress(100, "s", stream=quiet, enabled=False) as p:
        p.update(100)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_a_bar():
    out = Terminal()
    with Progress(100, "train", stream=out) as p:
        assert p.bar is not None
        p.update(100)
    assert "\r" in out.getvalue() and "100/100" in out.getvalue()
