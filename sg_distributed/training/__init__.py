"""The training run: the engine behind one interface, checkpoints, the method switch, argument checks, graceful
stops, fault injection for tests, held-out evaluation and the metrics log (used by ``launch/train_qa.py``)."""
