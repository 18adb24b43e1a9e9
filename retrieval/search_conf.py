"""SearchConf: everything one search can be asked, in a module that loads no network (nor
torch), so that `retr query --help` reads its defaults from the same object the API validates
with. retrieval.search, the search path, re-exports it.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from features.core import StrictConf
from features.matcher_names import check_plan
from retrieval.rerank import RerankConf


class SearchConf(StrictConf):
    """Everything one search can be asked: the CLI's `retr query` options, the service's query
    parameters and `Retriever.search`'s keywords are these fields."""

    k: int = Field(default=10, ge=1)
    """Results returned."""
    rerank: bool = True
    """Rerank the shortlist with local features (False: global ranking only)."""
    shortlist: int = Field(default=100, ge=1)
    """Global candidates reranked."""
    vote_top: int = Field(default=10, ge=1)
    """Results the landmark vote looks at, whatever k is (so -k 3 names the same landmark)."""
    rerank_conf: RerankConf = RerankConf()
    """Matching and verification of the reranked candidates."""
    matcher: str | None = None
    """Matcher of the rerank: auto, mnn, lightglue or mnn+lightglue (None: the index's)."""
    qe: int = Field(default=5, ge=0)
    """αQE: expand the query with its best n database neighbours and search again (0: off;
    default 5, chosen on `retr eval mini --queries all`: docs/results.md)."""
    qe_alpha: float = Field(default=3.0, ge=0)
    """αQE weight exponent."""
    dba: int = Field(default=3, ge=0)
    """DBA: rank by database descriptors averaged with their n nearest neighbours (0: off;
    default 3, chosen with qe)."""
    dba_alpha: float = Field(default=3.0, ge=0)
    """DBA weight exponent."""

    @field_validator("matcher")
    @classmethod
    def _known_matcher(cls, value: str | None) -> str | None:
        return None if value is None else check_plan(value)
