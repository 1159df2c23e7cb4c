"""normlab's instruments inside other training frameworks; each needs its optional extra.

* :mod:`normlab.integrations.lightning`: :class:`~normlab.integrations.lightning.ProbeCallback`,
  the probes (and optionally the BN doctor) as a PyTorch Lightning callback
  (``pip install 'normlab[lightning]'``).

Importing this package imports no framework; importing a submodule without its extra raises a
:class:`~normlab.errors.ConfigError` whose one line names the extra to install.
"""
