"""The former name of :mod:`peft_pat.offline_models` (0.4.0 and earlier), kept so existing imports such as
``from peft_pat.pretrained import load_causal_lm`` keep working; new code imports ``peft_pat.offline_models``."""

from .offline_models import *  # noqa: F403
from .offline_models import __all__  # noqa: F401
