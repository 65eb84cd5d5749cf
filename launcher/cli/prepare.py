"""`lmforge prepare`: text -> tokenizer -> memmap shards."""

from __future__ import annotations

import argparse

from lmforge.launcher.cli.common import Handler, add_command


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sp = add_command(
        sub,
        "prepare",
        "Text -> tokenizer (trained: SentencePiece or byte-level BPE; or a model's own: "
        "tokenizer.path) -> memmap shards with a manifest.",
    )
    sp.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    sp.add_argument(
        "--verify",
        metavar="DIR",
        help="only check the shards of an already prepared DIR against its manifest",
    )


def _prepare(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.pretrain.config.schema import PrepareConfig, load_config, to_yaml

    if args.verify:
        from lmforge.pretrain.data.prepare import verify_shards

        verify_shards(args.verify)
        print(f"{args.verify}: every shard matches its manifest")
        return 0
    cfg = load_config(PrepareConfig, args.config)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from lmforge.pretrain.data.prepare import prepare

    prepare(cfg)
    return 0


HANDLERS: dict[str, Handler] = {"prepare": _prepare}
