import sys

from terabrain.cli import main

sys.exit(main())
