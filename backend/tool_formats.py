"""Tool-call formats of chat templates that have one of their own, for `tool_choice` `auto`.

A template with a native format lists the tools in its own words (it is given `tools`), and the
model opens each call with the format's marker. Generation then runs free until that marker
appears, and only from there does the call grammar take over: llama.cpp's lazy grammar with
triggers (`common/chat.cpp`, `common_chat_params_init_hermes_2_pro`: trigger word `<tool_call>`,
a JSON `{"name", "arguments"}` call, closed by `</tool_call>`), built here from llguidance's lazy
lexemes. `backend.tools.NativeReplyReader` reads such a reply back.

Known formats: Hermes-style `<tool_call>` (Hermes 2 Pro, Qwen 2.5 and others). A format whose
marker is a special token (Mistral v0.3's `[TOOL_CALLS]`, Llama 3's `<|python_tag|>`) is not
used: special tokens are left out of the reply's text, so its calls could not be told from its
text; such templates, and templates without a format, get the generic one (`backend.tools`).

The bottom of the tool layer: it knows formats and grammars, not requests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import llguidance

from backend.errors import InvalidRequestError
from backend.structured import JSON_OPTIONS


@dataclass(frozen=True)
class NativeFormat:
    """How a template's model writes a call: `opening`, one JSON call, `closing`."""

    name: str
    opening: str
    closing: str

    def grammar(self, calls: list[dict[str, Any]], most: int) -> str:
        """Free text, in which each `opening` starts a call that follows one of `calls` (the
        schemas of `{"name", "arguments"}`) and ends with `closing`; at most `most` calls.

        llguidance's lazy lexeme (docs/syntax.md, "Tool calling"; what its `StructTag` builds):
        the text before an opening matches as little as it can, so the call's grammar takes
        over as soon as the opening is written."""
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        call = json.dumps({**one, "x-guidance": JSON_OPTIONS})
        opening, closing = json.dumps(self.opening), json.dumps("\n" + self.closing)
        # The text after the last call holds no opening: past `most` calls, none can start.
        after = f"/(?s:.*)/ & ~/(?s:.*){re.escape(self.opening)}(?s:.*)/"
        grammar = (
            "%llguidance {}\n"
            f"start: call{{0,{most}}} AFTER\n"
            f'call: call_opening "\\n" %json {call} {closing}\n'
            f"call_opening[lazy]: TEXT {opening}\n"
            "TEXT: /(.|\\n)*/\n"
            f"AFTER: {after}\n"
        )
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            raise InvalidRequestError(f"The tools cannot be used: {error}", param="tools")
        return grammar


HERMES = NativeFormat("hermes", "<tool_call>", "</tool_call>")
FORMATS = {HERMES.name: HERMES}


def native_format(tokenizer: Any) -> NativeFormat | None:
    """The tool-call format the tokenizer's chat template writes, if it has one this server
    can read back: the template must take `tools` and open calls with a marker that stays in
    the decoded text."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or "tools" not in template:
        return None
    for candidate in FORMATS.values():
        if candidate.opening in template and not _is_special(tokenizer, candidate.opening):
            return candidate
    return None


def _is_special(tokenizer: Any, text: str) -> bool:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1 and ids[0] in set(tokenizer.all_special_ids)


def partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
