import sys

from foresight_lab.cli import main

sys.exit(main())
