"""``python -m supermerge``: the same command line as ``supermerge``."""

from supermerge.cli.main import main

if __name__ == "__main__":
    main()
