"""The benchmark scripts' helpers: fastbert.benchtools (shared with ``fastbert bench``)."""

from fastbert.benchtools import *  # noqa: F403
from fastbert.benchtools import _git  # noqa: F401
