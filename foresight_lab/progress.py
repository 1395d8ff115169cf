"""Progress bars for what a person waits for: fetching, loading weights, compiling, evaluating.

tqdm's notebook-aware bars show as widgets in Jupyter and as text in a terminal. With
`progress=None` (the default everywhere) a bar appears only where someone watches: in a
terminal or a Jupyter kernel, not in a log file or CI; `FORESIGHT_LAB_PROGRESS=0` or
`=1` decides for the whole process, and `progress=False` for one call.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def _in_jupyter_kernel() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def wanted(progress: bool | None) -> bool:
    """Whether to show a bar: as asked, else by FORESIGHT_LAB_PROGRESS, else if watched."""
    if progress is not None:
        return progress
    setting = os.environ.get("FORESIGHT_LAB_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return _in_jupyter_kernel() or sys.stderr.isatty()


def progress_bar(*args, progress: bool | None = None, **kwargs) -> tqdm:
    """A tqdm bar (a widget in Jupyter) that is silent unless `wanted(progress)`."""
    return tqdm(*args, disable=not wanted(progress), **kwargs)
