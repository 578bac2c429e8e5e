"""The progress bar: drawn only on a terminal, only after the delay, with a
time estimate; completed on success, erased on error; never left behind by
the CLI."""

from __future__ import annotations

import io

import pytest

import udfc_ref
from udfc_ref import cli, progress
from udfc_ref.progress import Progress

from helpers import vgg


class Tty(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: '\\r' returns to column 0 and
    overwrites, '\\n' ends a line; trailing blanks dropped."""
    lines, cur, col = [], [], 0
    for ch in text:
        if ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
    if "".join(cur).strip():
        lines.append("".join(cur).rstrip())
    return lines


def test_nothing_before_the_delay():
    s, clock = Tty(), Clock()
    with Progress(10, "work", stream=s, clock=clock) as bar:
        for i in range(10):
            clock.t += 0.05  # 0.5 s in all: below the 1 s delay
            bar.update(i + 1)
    assert s.getvalue() == ""


def test_nothing_on_a_non_terminal():
    s, clock = io.StringIO(), Clock()
    with Progress(10, "work", stream=s, clock=clock) as bar:
        for i in range(10):
            clock.t += 5
            bar.update(i + 1)
    assert s.getvalue() == ""


def test_bar_with_estimate_then_completed_line():
    s, clock = Tty(), Clock()
    with Progress(4, "compress", stream=s, clock=clock) as bar:
        clock.t += 2.0
        bar.update(1, "conv1")  # 1 of 4 in 2 s: 6 s left
        shown = screen(s.getvalue())
        assert len(shown) == 1
        assert shown[0].startswith("compress [#####...............]  25%  1/4  0:06 left  conv1"), shown
        clock.t += 2.0
        bar.update(2, "conv2")  # 2 of 4 in 4 s: 4 s left
        assert screen(s.getvalue()) == ["compress [##########..........]  50%  2/4  0:04 left  conv2"]
        clock.t += 4.0
        bar.update(4)
    # success: the bar is completed with the total time and its line ended
    assert s.getvalue().endswith("\n")
    assert screen(s.getvalue()) == ["compress [####################] 100%  4/4  0:08 total"]


def test_error_erases_the_bar():
    s, clock = Tty(), Clock()
    with pytest.raises(RuntimeError):
        with Progress(4, "eval", stream=s, clock=clock) as bar:
            clock.t += 3
            bar.update(1)
            assert screen(s.getvalue())
            raise RuntimeError("boom")
    assert screen(s.getvalue()) == [] and not s.getvalue().endswith("\n")
    assert progress._ACTIVE == []


def test_message_is_printed_above_the_bar_which_comes_back():
    s, clock = Tty(), Clock()
    with Progress(4, "eval", stream=s, clock=clock) as bar:
        clock.t += 3
        bar.update(1)
        progress.message("udfc: warning: something", s)
        assert screen(s.getvalue()) == ["udfc: warning: something"]
        clock.t += 3
        bar.update(2)
        assert screen(s.getvalue())[0] == "udfc: warning: something"
        assert screen(s.getvalue())[1].startswith("eval [")


def test_abort_all_erases_bars_left_open():
    s, clock = Tty(), Clock()
    bar = Progress(4, "compress", stream=s, clock=clock)
    clock.t += 3
    bar.update(2)
    progress.abort_all()
    assert screen(s.getvalue()) == [] and progress._ACTIVE == []


def test_disabled_bar_is_a_no_op():
    s, clock = Tty(), Clock()
    with Progress(3, "x", stream=s, clock=clock, enabled=False) as bar:
        clock.t += 10
        bar.advance(3)
    assert s.getvalue() == ""


def test_note_cannot_break_the_line():
    s, clock = Tty(), Clock()
    with Progress(2, "import", stream=s, clock=clock) as bar:
        clock.t += 2
        bar.update(1, "evil\nname\rhere")
        assert "\n" not in s.getvalue() and screen(s.getvalue())[0].endswith("evil name here")


def test_broken_stream_does_not_fail_the_work():
    class Broken(Tty):
        def write(self, _):
            raise OSError(32, "Broken pipe")

    clock = Clock()
    with Progress(2, "x", stream=Broken(), clock=clock) as bar:
        clock.t += 2
        bar.update(1)
        bar.update(2)


# ------------------------------------------------------------------- CLI

@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "m.safetensors"
    udfc_ref.save(vgg(), p)
    return p


def test_cli_draws_nothing_on_a_non_tty_stderr(model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0.0)  # as if every step took seconds
    assert cli.main(["compress", str(model_file), str(tmp_path / "o.safetensors"),
                              "--prune-ratio", "0.5"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_error_after_progress_leaves_one_clean_line(model_file, tmp_path, monkeypatch):
    import udfc_ref.compression as comp
    from udfc_ref import NumericError

    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    monkeypatch.setattr(progress, "DELAY", 0.0)
    real = comp.absorb

    def fail_late(model, node, *a, **k):
        if node.name == "fc":  # the last layer: the bar has been drawn for the earlier ones
            raise NumericError("layer 'fc': injected failure")
        return real(model, node, *a, **k)

    monkeypatch.setattr(comp, "absorb", fail_late)
    out = tmp_path / "o.safetensors"
    assert cli.main(["compress", str(model_file), str(out), "--prune-ratio", "0.5"]) == 1
    text = tty.getvalue()
    assert "compress [" in text  # the bar was drawn ...
    assert screen(text) == ["udfc: error: layer 'fc': injected failure"]  # ... and erased before the error
    assert not out.exists()


def test_cli_success_on_a_tty_ends_the_bar_line(model_file, tmp_path, monkeypatch, capsys):
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    monkeypatch.setattr(progress, "DELAY", 0.0)
    assert cli.main(["compress", str(model_file), str(tmp_path / "o.safetensors"),
                              "--prune-ratio", "0.5"]) == 0
    shown = screen(tty.getvalue())
    assert len(shown) == 1 and shown[0].startswith("compress [####################] 100%  4/4") \
        and shown[0].endswith("total"), shown
