"""``python -m livediff.runner``: the same as the ``livediff-runner`` command."""

from livediff.runner.main import main

if __name__ == "__main__":
    main()
