"""How every `tensorgate` command prints its help: descriptions kept as written (paragraphs,
examples), and each option's default shown after its help unless the help already says it."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, "", argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def command(sub, name: str, summary: str, description: str = "", **kwargs):
    """A subcommand whose one-line `summary` is its entry in the parent's list and the first line
    of its own --help, followed by `description`."""
    text = summary[0].upper() + summary[1:] + "." + (f"\n\n{description}" if description else "")
    return sub.add_parser(
        name, help=summary, description=text, formatter_class=HelpFormatter, **kwargs
    )
