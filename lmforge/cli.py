"""lmforge: one toolkit for the whole life of a language model.

The command line is a table from subcommand to a typed function: its signature becomes the
flags (a leading string parameter with a default becomes an optional positional, as in
`lmforge pull NAME`; a keyword-only one without a default, a required flag), its docstring
the --help text. Modules load only when their command
runs, which keeps `lmforge --help` instant.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import typing
from typing import Any, Callable

# subcommand -> "module:function"
COMMANDS: dict[str, str] = {
    "pull": "lmforge.commands:pull",
    "list": "lmforge.commands:list_",
    "info": "lmforge.commands:info",
    "generate": "lmforge.commands:generate",
    "chat": "lmforge.commands:chat",
    "bench": "lmforge.commands:bench",
    "serve": "lmforge.commands:serve",
    "export": "lmforge.commands:export",
    "ingest": "lmforge.data.ingest:ingest_command",
    "review": "lmforge.data.review:review_command",
    "rag-index": "lmforge.rag.commands:index_command",  # also `lmforge rag index`
    "rag-ask": "lmforge.rag.commands:ask_command",  # also `lmforge rag ask`
    "agent": "lmforge.agents.commands:agent_command",
    "guard": "lmforge.safety.commands:guard_command",
    "quantize": "lmforge.compression.commands:quantize",
    "prune": "lmforge.compression.commands:prune",
    "merge": "lmforge.compression.commands:merge",
    "finetune": "lmforge.training.finetune:finetune",
    "pretrain": "lmforge.training.pretrain:pretrain",
    "data": "lmforge.training.finetune:data",
}


def _load(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _doc_parts(func: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """Split a docstring into its description and its `Args:` entries."""
    doc = inspect.getdoc(func) or ""
    description, _, args_block = doc.partition("Args:")
    helps: dict[str, str] = {}
    for line in args_block.splitlines():
        name, sep, text = line.strip().partition(":")
        if sep and name.isidentifier():
            helps[name] = text.strip()
    return description.strip(), helps


def _add_arguments(parser: argparse.ArgumentParser, func: Callable[..., Any]) -> None:
    hints = typing.get_type_hints(func)
    _, helps = _doc_parts(func)
    for index, (name, param) in enumerate(inspect.signature(func).parameters.items()):
        kind = hints.get(name, str)
        help_text = helps.get(name, "")
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
            kind = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(kind), typing.get_args(kind)
        flag = "--" + name.replace("_", "-")
        if param.default is inspect.Parameter.empty and param.kind is inspect.Parameter.KEYWORD_ONLY:
            parser.add_argument(flag, dest=name, type=kind, required=True, help=help_text)  # `*, out: str`
        elif param.default is inspect.Parameter.empty:
            nargs = "+" if origin is list else None
            parser.add_argument(name, type=args[0] if origin is list else kind, nargs=nargs, help=help_text)
        elif index == 0 and kind is str:  # `lmforge pull NAME`: a leading optional positional
            parser.add_argument(name, nargs="?", default=param.default, help=f"{help_text} (default: {param.default})")
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=param.default,
                                help=help_text)
        elif origin is list:
            parser.add_argument(flag, dest=name, type=args[0], nargs="*", default=param.default, help=help_text)
        elif origin is typing.Literal:
            parser.add_argument(flag, dest=name, choices=args, default=param.default,
                                help=f"{help_text} (default: {param.default})")
        else:
            parser.add_argument(flag, dest=name, type=kind, default=param.default,
                                help=f"{help_text} (default: {param.default})")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name)
            continue
        func = _load(target)
        description, _ = _doc_parts(func)
        p = sub.add_parser(name, help=description.splitlines()[0] if description else "", description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_arguments(p, func)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and f"{argv[0]}-{argv[1]}" in COMMANDS:  # `lmforge rag index` == `lmforge rag-index`
        argv = [f"{argv[0]}-{argv[1]}", *argv[2:]]
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    kwargs = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        result = _load(COMMANDS[args.command])(**kwargs)
    except (ValueError, OSError) as err:  # boundary errors carry a message naming the fix
        print(f"lmforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
