"""Progress bars: as tqdm in a terminal, rare redraws into a log (petal_fast.progress)."""
from __future__ import annotations

import io
import time

import pytest

from petal_fast import settings
from petal_fast.progress import progress

LOG_INTERVAL = settings.Settings().progress_interval  # the default


@pytest.fixture(autouse=True)
def default_interval():
    """Whatever the shell that runs the tests set, these tests start from the default."""
    with settings.override(progress_interval=LOG_INTERVAL):
        yield


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream: io.StringIO, steps: int = 60, pause: float = 0.005) -> str:
    for _ in progress(range(steps), file=stream, desc="work"):
        time.sleep(pause)
    return stream.getvalue()


def test_log_gets_the_first_and_last_state_only():
    log = _run(io.StringIO())
    redraws = [chunk for chunk in log.split("\r") if chunk.strip()]
    assert len(redraws) <= 2, redraws          # 0/60 and 60/60, nothing in between
    assert "60/60" in redraws[-1]


def test_terminal_keeps_tqdm_redraws():
    screen = _run(Terminal(), steps=60, pause=0.01)  # 0.6 s at tqdm's 0.1 s interval: several redraws
    assert len([chunk for chunk in screen.split("\r") if chunk.strip()]) >= 4


def test_intervals():
    with progress(total=3, file=io.StringIO()) as bar:
        assert bar.mininterval == LOG_INTERVAL and bar.maxinterval >= LOG_INTERVAL
    with progress(total=3, file=Terminal()) as bar:
        assert bar.mininterval == 0.1                # tqdm's own default
    with progress(total=3, file=io.StringIO(), mininterval=2.0) as bar:
        assert bar.mininterval == 2.0                # an explicit argument wins
    with settings.override(progress_interval=5), progress(total=3, file=io.StringIO()) as bar:
        assert bar.mininterval == 5.0
    with progress(total=3, file=io.StringIO()) as bar:
        assert bar.mininterval == LOG_INTERVAL       # the override ended


@pytest.mark.parametrize("value", ["soon", "-1", float("nan")])
def test_bad_interval_names_the_setting_and_changes_nothing(value):
    with pytest.raises(ValueError, match="progress_interval .PETAL_FAST_PROGRESS_INTERVAL. must be"):
        settings.configure(progress_interval=value)
    assert settings.current().progress_interval == LOG_INTERVAL


def test_every_progress_bar_goes_through_the_helper():
    """tqdm is imported only by petal_fast/progress.py, so no bar floods a log."""
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    offenders = [str(path.relative_to(repo)) for folder in ("petal_fast", "kernels", "benchmarks")
                 for path in (repo / folder).rglob("*.py")
                 if path.name != "progress.py" and ("from tqdm" in path.read_text() or "import tqdm" in path.read_text())]
    assert offenders == []
