"""The training run: the loop object (``TrainingLoop``) and its options, the engine behind one interface,
checkpoints, the method switch, argument checks, graceful stops, fault injection for tests, held-out evaluation
and the metrics log."""


def __getattr__(name):  # lazy: `import sg_distributed.training.checkpoint` must not load the whole loop
    if name == "TrainingLoop":
        from sg_distributed.training.loop import TrainingLoop

        return TrainingLoop
    if name == "options":
        from sg_distributed.training.cli import options

        return options
    raise AttributeError(f"module 'sg_distributed.training' has no attribute {name!r}")
