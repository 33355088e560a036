"""``python -m livediff.livepeer.airunner``: the same as the ``livediff-airunner`` command."""

from livediff.livepeer.airunner.main import main

if __name__ == "__main__":
    main()
