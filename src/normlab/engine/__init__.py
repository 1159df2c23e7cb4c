"""The parts of the training loop, below the loop itself and below what observes it.

``runtime`` resolves device, precision and memory layout; ``distributed`` holds process
groups, DDP and the reconciliation of BN statistics across ranks; ``optim`` builds the
optimizer, the learning-rate schedule and the Keras-style L2 penalty; ``state`` is what the
loop shows its callbacks (:class:`~normlab.engine.state.FitState`); ``callbacks`` is the
callback contract; ``evaluate`` measures a model on a loader. The loop
(:func:`normlab.train.fit`) and the probes (:mod:`normlab.probes`, which are callbacks) both
build on these; none of them imports either.
"""
