"""Converters from official checkpoints in other frameworks to retr's PyTorch state dicts.

Each module exposes a `convert_<method>(src, out)` function (the CLI's `retr convert <method>`)
and a pure name/layout mapping that tests exercise without the source framework installed.
"""
