import sys

from dmoe.cli import main

sys.exit(main())
