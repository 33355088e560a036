import sys

from livediff.cli import main

sys.exit(main())
