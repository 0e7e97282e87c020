import sys

from openmsk.cli import main

sys.exit(main())
