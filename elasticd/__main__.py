import sys

from elasticd.cli import main

sys.exit(main())
