"""TEST DOUBLE of ``runner.live`` (ai-runner v0.14.1)."""
