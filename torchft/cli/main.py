"""Entry point of the ``tune`` console script (placeholder until the CLI lands)."""
import sys


def main(argv=None) -> int:
    print("usage: tune [-h] {run,ls,cp,cat,validate,download} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
