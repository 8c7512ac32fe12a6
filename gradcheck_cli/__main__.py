"""python -m gradcheck_cli: the same as the `gradcheck` command."""

from gradcheck_cli.cli import main

if __name__ == "__main__":
    main()
