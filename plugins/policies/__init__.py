"""
The built-in ranking policies (:class:`plugins.base.RankingPolicy`).

======== ===================================== ==============================================
name     class                                 what it does
======== ===================================== ==============================================
blend    :class:`~plugins.policies.blend.BlendPolicy`      model score, popularity and freshness
mmr      :class:`~plugins.policies.mmr.MmrPolicy`          diversity by maximal marginal relevance
explore  :class:`~plugins.policies.explore.ExplorePolicy`  Thompson sampling for new items
rules    :class:`~plugins.policies.rules.RulesPolicy`      filters, boost/bury, category cap, pins
======== ===================================== ==============================================

Each is built from its config table, ``Cls(**params)``, and checks its parameters
there. ``apply`` is pure numpy on the request path (``mmr`` calls one jitted kernel).

Order them as in the table: ``blend`` computes new scores and sorts by them, so it
goes first; ``mmr`` and ``explore`` move items without new scores of their own and
hand on scores carried by position (sorted, so later policies keep their order);
``rules`` goes last so that its filters and pins hold in the response.
"""

from plugins.policies.blend import BlendPolicy
from plugins.policies.explore import ExplorePolicy
from plugins.policies.mmr import MmrPolicy
from plugins.policies.rules import RulesPolicy

__all__ = ["BlendPolicy", "ExplorePolicy", "MmrPolicy", "RulesPolicy"]
