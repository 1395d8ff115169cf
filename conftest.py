"""Repository-wide test settings: keep Jupyter's files inside the build tree, stay offline."""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent
JUPYTER = ROOT / ".cache" / "jupyter"

for variable, folder in {
    "JUPYTER_RUNTIME_DIR": "runtime",
    "JUPYTER_CONFIG_DIR": "config",
    "JUPYTER_DATA_DIR": "data",
    "IPYTHONDIR": "ipython",
    "MPLCONFIGDIR": "matplotlib",
}.items():
    os.environ.setdefault(variable, str(JUPYTER / folder))
    pathlib.Path(os.environ[variable]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
