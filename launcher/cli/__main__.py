import sys

from lmforge.launcher.cli import main

sys.exit(main())
