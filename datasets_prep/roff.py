"""Man pages (roff source, man and mdoc macros) to the plain text a reader sees.

Not a roff interpreter: requests that only steer layout are dropped, macros that carry words
(.B, .BR, .SH, .IP, .Nm, ...) become those words, and escapes become the characters they print
or nothing. Strings defined with .ds are substituted, because generators such as DocBook and
pod2man spell quotes that way (`\\*(Aq`) and dropping them would corrupt code examples.
"""
from __future__ import annotations

import re

_SPECIAL_CHARS = {"em": "--", "en": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "bu": "*",
                  "co": "(c)", "rg": "(R)", "mi": "-", "pl": "+", "ti": "~", "ha": "^", "cq": "'",
                  "oq": "'", "rs": "\\", "hy": "-", "ga": "`", "at": "@", "sh": "#", "dg": "+",
                  "<=": "<=", ">=": ">=", "!=": "!=", "==": "==", "->": "->", "<-": "<-",
                  "mu": "x", "tm": "(TM)", "sl": "/", "ba": "|", "br": "|", "lB": "[", "rB": "]",
                  "lC": "{", "rC": "}", "la": "<", "ra": ">", "tf": "therefore", "de": "deg"}
# Predefined strings of the man/mdoc packages, used before any .ds of the page itself.
_PREDEFINED_STRINGS = {"R": "(R)", "Tm": "(TM)", "lq": '"', "rq": '"', "S": "", "Aq": "'",
                       "C+": "C++", "C`": '"', "C'": '"', "Ba": "|", "Lq": '"', "Rq": '"'}

# One alternation, applied once from left to right, so the output of one escape is never read
# again as the start of another (a literal backslash followed by "f" stays text).
_ESCAPE = re.compile(r"""\\(?:
      (?P<font>f(?:\[[^\]]*\]|\(..|.))
    | (?P<size>s[+-]?(?:\(\d\d|\[[^\]]*\]|\d))
    | \*(?:\[(?P<string_long>[^\]]*)\]|\((?P<string_two>..)|(?P<string_one>.))
    | \((?P<char_two>..)
    | \[(?P<char_long>[^\]]*)\]
    | (?P<register>[nmg](?:\[[^\]]*\]|\(..|.))
    | (?P<quoted>[hvwoDNlLbxXZSRkAB])'[^']*'
    | (?P<literal>[-e\\.'`])
    | (?P<space>[ ~0])
    | (?P<silent>[|^&%:,/c{}dutp!?zk$]|$)
)""", re.VERBOSE)

_BREAK_REQUESTS = {"PP", "LP", "P", "TP", "TQ", "br", "sp", "HP", "RS", "RE", "nf", "fi", "EX",
                   "EE", "in", "ti", "Pp", "Bl", "El", "Bd", "Ed", "Sh", "Ss", "It", "TE", "TS"}
_WORD_MACROS = {"B", "I", "SM", "SB", "SH", "SS", "Nm", "Nd", "Ar", "Fl", "Op", "Cm", "Pa", "Dv",
                "Ev", "Va", "Em", "Sy", "Li", "Xr", "Ql", "Dq", "Sq", "Pq", "Ic", "Fn", "Ft", "Fa"}
_ALTERNATING_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}  # fonts alternate, words touch
_LINK_MACROS = {"UR", "MT"}
_SKIPPED_BLOCKS = {"de": "..", "de1": "..", "am": "..", "ig": ".."}
_ARGUMENT = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')


def _arguments(text: str) -> list[str]:
    """Macro arguments: blank-separated, double quotes group, "" inside quotes is a quote."""
    return [m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2)
            for m in _ARGUMENT.finditer(text)]


class _Escapes:
    def __init__(self):
        self.strings = dict(_PREDEFINED_STRINGS)

    def __call__(self, match: re.Match) -> str:
        kind = match.lastgroup
        if kind in ("string_long", "string_two", "string_one"):
            return self.strings.get(match.group(kind), "")
        if kind in ("char_two", "char_long"):
            name = match.group(kind)
            if name.startswith("u") and re.fullmatch(r"u[0-9A-F]{4,6}", name):
                return chr(int(name[1:], 16))
            return _SPECIAL_CHARS.get(name, "")
        if kind == "literal":
            char = match.group(kind)
            return {"-": "-", "e": "\\", "\\": "\\"}.get(char, char)
        if kind == "space":
            return " "
        return ""  # fonts, sizes, registers, motions, comments' starts: nothing visible

    def apply(self, line: str) -> str:
        comment = re.search(r'(?<!\\)(?:\\\\)*\\"', line)  # \" ends the line, \\" does not
        if comment:
            line = line[:comment.start() + (comment.end() - comment.start() - 2)]
        return _ESCAPE.sub(self, line)


def strip_roff(source: str) -> str:
    """Plain text of a man page: macros become line breaks or their words, escapes go."""
    escapes = _Escapes()
    out: list[str] = []
    block_end: str | None = None
    in_table_format = False
    for line in source.split("\n"):
        if block_end is not None:
            if line.strip() == block_end:
                block_end = None
            continue
        if in_table_format:  # tbl options and format lines, up to the one ending in "."
            in_table_format = not line.rstrip().endswith(".")
            continue
        if not line.startswith((".", "'")):
            out.append(escapes.apply(line))
            continue
        name, _, rest = line[1:].strip().partition(" ")
        # conditionals (.if/.ie/.el) can hide a .ds; the last definition in the page wins
        defined = re.search(r"\.ds\s+(\S+)\s?\"?(.*)$", line)
        if defined:
            escapes.strings[defined.group(1)] = escapes.apply(defined.group(2))
            continue
        if name in _SKIPPED_BLOCKS:
            block_end = _SKIPPED_BLOCKS[name]
        elif name == "TS":
            in_table_format = True
            out.append("")
        elif name in _WORD_MACROS or name in _ALTERNATING_MACROS or name in ("IP", "Nm"):
            words = [escapes.apply(arg) for arg in _arguments(rest)]
            if name == "IP":
                words = words[:1]  # the tag; the second argument is an indent
            text = ("" if name in _ALTERNATING_MACROS else " ").join(words)
            out.append(text.upper() if name == "SH" else text)
        elif name in _LINK_MACROS and rest:
            out.append(escapes.apply(_arguments(rest)[0]))
        elif name in _BREAK_REQUESTS:
            out.append("")
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
