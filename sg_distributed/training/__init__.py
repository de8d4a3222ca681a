"""Training-run plumbing shared by the launch scripts: argument checking (``arguments.py``)."""
