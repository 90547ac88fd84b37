"""``tfstack cache list|clear``: the shared frozen-feature cache's entries, and removing them.

The directory is ``--dir``, else the project's ``train.feature_cache_dir`` (with overrides, when
``conf/`` is there), else ``$TFSTACK_FEATURE_CACHE``, else ``~/.cache/tfstack/features``: the
one ``tfstack run`` in the same place uses.
"""

from __future__ import annotations

from pathlib import Path

from tfstack.feature_cache import DEFAULT_MAX_GB, FeatureCache, listing, resolve_root


def cache_of(args) -> FeatureCache:
    """The cache the command's arguments name."""
    configured, max_gb = None, DEFAULT_MAX_GB
    if args.dir:
        configured = args.dir
    elif Path(args.config_dir).is_dir():
        from tfstack.pipeline.compose import compose

        config = compose(args.overrides, config_dir=args.config_dir)
        configured, max_gb = config.train.feature_cache_dir, config.train.feature_cache_max_gb
    return FeatureCache(resolve_root(configured), max_bytes=int(max_gb * 1e9))


def main(args) -> int:
    """Print the entries (``list``) or remove them (``clear [KEY ...]``); the exit code."""
    cache = cache_of(args)
    if args.action == "list":
        print(listing(cache))
        return 0
    count, size = cache.clear(args.keys)
    print(f"tfstack cache: removed {count} entries ({size / 1e6:.1f} MB) from {cache.root}")
    return 0
