import sys

from lit_prune.search.cli import main

if __name__ == "__main__":
    sys.exit(main())
