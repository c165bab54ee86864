"""The round protocol, in one place: every exchange between rank 0 and the slots is a class
holding rank 0's half (``server``) next to the slots' half (``slot``), and everything they tell
each other is a :class:`~hpcfl.protocol.message.Message` (named, typed fields; the small numeric
ones travel as one float64 buffer laid out from the declared fields).

Once per launch, the start-up exchanges of :data:`hpcfl.protocol.startup.STARTUP`, in order:
LayoutExchange (how the model is flattened), InitExchange (fresh run: slot 0's seeded weights;
resumed: the checkpoint's), SiteInfoExchange (each site's size and planned steps), KeysExchange
(secure aggregation's public keys). Then the initial global model (ModelExchange) and round 1's plan.

How updates travel and what rank 0 computes from them is the aggregation kind's
(:mod:`hpcfl.protocol.kinds`: one object per kind, both halves and the math), chosen once from
the strategy's ``kind``.

Per round r (slots already hold the global model w[r-1] and the round's plan); in capitals, the
points at which both loops run the registered per-round exchanges of :data:`hpcfl.protocol.rounds.ROUND`
(each one class with both halves: a new one is a class appended there, and neither loop changes)::

  rank 0   PlanExchange: who is sampled, drops out or misses the deadline         -> every slot rank
  BEFORE_TRAINING (nothing built in)
  slots    each slot trains its returning sites in turn from w[r-1]; per site: locally tuned
           evaluation, update d_s = w_s - w[r-1] through the privacy filters, added to the kind
  AFTER_TRAINING  TrainReports: a TrainReport, one TrainRow per site              leaders -> rank 0
                  then the sites whose updates count (finite ones)                rank 0 -> leaders
  leaders  the kind's upload: mean rules one Reduce per slot (mean.py),
           coordinate-wise and selection rules a chunked Gatherv (gathered.py)    -> rank 0
  rank 0   w[r] = strategy(the kind's aggregate) (+ DP noise: privacy/server.py, via Strategy.on_sum)
  AFTER_AGGREGATION  GlobalModel: w[r]                                            rank 0 -> leaders -> slot ranks
  slots    evaluate w[r] on each site's validation data
  AFTER_EVALUATION  EvalReports: SlotTimes and one EvalRow per site               leaders -> rank 0
  rank 0   PlanExchange of round r+1 (or "stop"), then logs and checkpoints round r
           while the slots already train round r+1
  END_OF_RUN (after the last round)  CrossSiteExchange (eval.cross_site)

Rank 0's loop is :meth:`hpcfl.protocol.server.Aggregator.run`, the slots' is
:meth:`hpcfl.site.slot.SlotWorker.run`; both run the exchanges in the order above.
"""
from __future__ import annotations

from .control import Control, ModelExchange, Participation, ParticipationExchange, PlanExchange, RowsExchange
from .message import Message, per_site
from .rounds import ROUND, RoundExchange, ServerRound, SlotRound

__all__ = ["Control", "Message", "ModelExchange", "Participation", "ParticipationExchange", "PlanExchange", "ROUND",
           "RoundExchange", "RowsExchange", "ServerRound", "SlotRound", "per_site"]
