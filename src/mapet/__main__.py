import sys

from mapet.cli import main

sys.exit(main())
