"""`python -m mechanic ...` runs the command line (what torchrun starts: `torchrun -m mechanic run RECIPE`)."""

from mechanic.cli import main

if __name__ == "__main__":
    main()
