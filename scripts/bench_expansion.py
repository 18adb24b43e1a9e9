"""αQE and DBA (retrieval.expansion) on landmarks-mini, side by side in one evaluation run.

Every variant is a mode of one `run_eval` (each query is described once for all of them):
global ranking with and without αQE / DBA at a few settings, and optionally the same with the
rerank (--rerank, with the index's matcher unless --matcher). Prints the evaluation table
(overall and per kind).

    python scripts/bench_expansion.py --index /tmp/idx-mini --qe 1,2,3,5 --dba 1,2,3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from retrieval.evaluation.datasets import landmarks_mini
from retrieval.evaluation.runner import format_table, run_eval, write_json
from retrieval.search import SearchConf

console = Console(width=200)


def variants(args: argparse.Namespace) -> dict[str, SearchConf]:
    """name -> settings: every --qe and --dba value alone, and each pair in --both."""
    out: dict[str, SearchConf] = {}
    base = {"rerank": args.rerank, "matcher": args.matcher, "qe": 0, "dba": 0}
    settings = [{"qe": int(n)} for n in args.qe.split(",") if n]
    settings += [{"dba": int(n)} for n in args.dba.split(",") if n]
    for pair in args.both.split(",") if args.both else ():
        qe, dba = pair.split("+")
        settings.append({"qe": int(qe), "dba": int(dba)})
    for s in settings:
        name = " ".join(f"{k}={v}" for k, v in s.items())
        out[name] = SearchConf(**{**base, **s}, qe_alpha=args.alpha, dba_alpha=args.alpha)
    if args.rerank:
        out = {"rerank": SearchConf(**base), **out}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/landmarks-mini"))
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--queries", default="all", help="first | all (leave-one-out)")
    p.add_argument("--qe", default="1,2,3,5", help="αQE neighbours to try")
    p.add_argument("--dba", default="1,2,3", help="DBA neighbours to try")
    p.add_argument("--both", default="", help="qe+dba pairs, e.g. 2+2,3+1")
    p.add_argument("--alpha", type=float, default=3.0)
    p.add_argument("--rerank", action="store_true", help="rerank every variant too")
    p.add_argument("--matcher", default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    dataset = landmarks_mini(args.data, queries=args.queries)
    result = run_eval(dataset, args.index, variants=variants(args))
    console.print(format_table(result))
    if args.json:
        console.print(f"wrote {write_json(result, args.json)}")


if __name__ == "__main__":
    main()
