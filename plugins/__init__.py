"""
Plugins: the protocols, the entry-point registry, and the built-ins.

`plugins.base` holds the two protocols, `plugins.registry` finds plugins through the
entry-point group ``rerankd.plugins``, ``privacy/`` and ``policies/`` hold the
built-ins. Plugins may import ``eventstore`` and ``kernels``, never ``daemon``
(DESIGN.md).
"""
