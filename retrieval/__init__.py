"""Search, reranking and recognition on top of a retr index.

- `matching`: mutual-nearest-neighbour descriptor matching.
- `verification`: RANSAC geometric verification with OpenCV's USAC.
- `rerank`: shortlist reranking by inlier counts.
- `recognition`: the landmark vote.
- `building`: corpus scanning and index building.
- `api`: the Retriever facade; `cli`: the `retr` command.
"""

from retrieval.api import Match, Recognition, Retriever

__all__ = ["Match", "Recognition", "Retriever"]
