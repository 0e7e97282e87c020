import sys

from openmsk.cli import main

if __name__ == "__main__":  # also keeps spawned helper processes from running the CLI again
    sys.exit(main())
