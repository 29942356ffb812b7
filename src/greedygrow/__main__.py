"""Entry point for `python -m greedygrow` (and `torchrun -m greedygrow`)."""

from greedygrow.cli import main

if __name__ == "__main__":
    main()
