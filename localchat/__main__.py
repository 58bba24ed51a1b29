"""`python -m localchat` runs the command-line tool."""

from localchat.cli import main

if __name__ == "__main__":
    main()
