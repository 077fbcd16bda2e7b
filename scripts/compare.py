"""Same as `tailtune-compare`: python scripts/compare.py logs/multiruns/<sweep>."""

from tailtune.cli.compare import main

if __name__ == "__main__":
    main()
