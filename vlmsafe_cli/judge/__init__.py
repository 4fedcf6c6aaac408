"""Response judges: the rule-based default labels a completion by the response taxonomy.

Harmful items: genuine_refusal | refusal_then_comply | compliance | degenerate.
Benign items: answered | over_refusal | degenerate.
"""

from vlmsafe_cli.judge.rules import HARMFUL_LABELS, HARMLESS_LABELS, is_degenerate, is_refusal, judge

__all__ = ["HARMFUL_LABELS", "HARMLESS_LABELS", "is_degenerate", "is_refusal", "judge"]
