"""Refusal judges: string matchers, the learned judge and a model judge, chosen by name with `get_judge`."""

from els.judges.learned import LearnedJudge
from els.judges.model import JUDGES, ModelJudge, get_judge
from els.judges.strings import Judge, PrefixJudge, SubstringJudge

__all__ = ["JUDGES", "Judge", "LearnedJudge", "ModelJudge", "PrefixJudge", "SubstringJudge", "get_judge"]
