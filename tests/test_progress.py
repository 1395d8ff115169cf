"""Progress bars show where someone watches, and stay quiet in logs or when asked."""

import io

from foresight_lab import progress


def test_an_explicit_choice_wins(monkeypatch):
    monkeypatch.setenv("FORESIGHT_LAB_PROGRESS", "0")
    assert progress.wanted(True) is True
    assert progress.wanted(False) is False


def test_the_environment_decides_when_not_asked(monkeypatch):
    monkeypatch.setenv("FORESIGHT_LAB_PROGRESS", "off")
    assert not progress.wanted(None)
    monkeypatch.setenv("FORESIGHT_LAB_PROGRESS", "1")
    assert progress.wanted(None)


def test_quiet_when_output_goes_to_a_file(monkeypatch):
    monkeypatch.delenv("FORESIGHT_LAB_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not progress.wanted(None)
    bar = progress.progress_bar(range(3), desc="Compiling")
    assert bar.disable and list(bar) == [0, 1, 2]


def test_shown_in_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("FORESIGHT_LAB_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr", Terminal())
    assert progress.wanted(None)
