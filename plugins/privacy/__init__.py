"""
The built-in privacy plugins: ``pseudonymize`` and ``mask``.

``pseudonymize`` turns user ids into keyed pseudonyms (on by default); ``mask`` drops
or masks personal data in ``context`` and item ``fields``.

They are registered in the entry-point group ``rerankd.plugins`` like any
third-party plugin, and imported only when the config lists them.
"""
