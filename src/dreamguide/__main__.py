import sys

from dreamguide.cli import main

sys.exit(main())
