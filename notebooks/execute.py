"""Runs every notebook top to bottom and stores its outputs (what nbval compares against).

python notebooks/execute.py [NOTEBOOK ...]
"""

import pathlib
import sys

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).parent


def main(paths: list[str]) -> None:
    for path in paths or sorted(str(p) for p in HERE.glob("[0-9]*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        NotebookClient(
            notebook,
            timeout=900,
            kernel_name="python3",
            resources={"metadata": {"path": str(HERE)}},
        ).execute()
        nbformat.write(notebook, path)
        print("executed", path)


if __name__ == "__main__":
    main(sys.argv[1:])
