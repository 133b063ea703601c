"""
The built-in privacy plugins: ``pseudonymize``, ``mask``, ``retention``, ``noise``.

``pseudonymize`` turns user ids into keyed pseudonyms (on by default); ``mask`` drops
or masks personal data in ``context`` and item ``fields``; ``retention`` has the daemon
delete events from the log after a configured age; ``noise`` adds Laplace noise to
the per-item aggregates of the ``export`` op.

They are registered in the entry-point group ``rerankd.plugins`` like any
third-party plugin, and imported only when the config lists them.
"""
