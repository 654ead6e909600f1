"""OpenAI's function tools over a model's own chat template: the tools rendered by the template,
the model's calls parsed back out of its text.

Models trained to call tools write each call as a JSON object between <tool_call> and
</tool_call> (Qwen2.5, Hermes and the templates that copy them; the template itself says so).
Those are the templates served here; a template with no tools, or whose calls take another
form, is refused rather than guessed at. `tool_choice` "required" or a named function starts
the answer inside a call (the call's opening written for the model), so the model's next tokens
are a call's; what the arguments hold is the model's."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ToolError(ValueError):
    """A request's tools, tool_choice or tool messages that cannot be served; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def template_calls_tools(template: str | None) -> bool:
    """Whether a chat template renders tools and has the model call them in <tool_call> tags."""
    return bool(template) and "tools" in template and OPEN in template  # type: ignore[operator]


class Tools:
    """A chat request's `tools` and `tool_choice`, checked."""

    def __init__(self, data: dict, template: str | None):
        tools, choice = data.get("tools"), data.get("tool_choice")
        self.functions: list[dict] = []
        self.prefill = ""  # the answer's opening, written for the model
        self.active = False  # whether the answer is parsed for calls
        self.names: list[str] = []  # of the tools offered
        self.named: str | None = None  # tool_choice's function
        if tools is None or tools == []:
            if choice not in (None, "none", "auto"):
                raise ToolError("tool_choice needs tools", "tool_choice")
            return
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise ToolError(f"tools must be a list of up to {MAX_TOOLS} functions", "tools")
        for i, t in enumerate(tools):
            f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not _NAME.match(f["name"]):
                raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} with "
                                "a name of letters, digits, _ . - (at most 64)", f"tools[{i}]")
            params = f.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict) or not isinstance(f.get("description", ""), str):
                raise ToolError(f"tools[{i}].function: parameters must be a JSON schema object and description "
                                "a string", f"tools[{i}].function")
            self.functions.append({"type": "function", "function": {
                "name": f["name"], "description": f.get("description", ""), "parameters": params}})
        names = self.names = [f["function"]["name"] for f in self.functions]
        if choice is None or choice == "auto":
            pass
        elif choice == "none":
            return  # rendered without tools: the model answers in text
        elif choice == "required":
            self.prefill = OPEN + "\n"
        elif isinstance(choice, dict) and choice.get("type") == "function" and \
                isinstance(choice.get("function"), dict) and choice["function"].get("name") in names:
            self.named = choice["function"]["name"]
            self.prefill = f'{OPEN}\n{{"name": {json.dumps(self.named)}, "arguments": '
        else:
            raise ToolError("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                            f"{{\"name\": NAME}}}} naming one of the tools ({', '.join(names)})", "tool_choice")
        if not template_calls_tools(template):
            raise ToolError("this model's chat template has no tools (or does not call them in <tool_call> "
                            "tags): send the request without tools", "tools")
        self.active = True


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI's assistant tool calls and tool results in the shape chat templates take: a call's
    arguments as an object (OpenAI sends them as a JSON string)."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls is None or m.get("role") != "assistant":
            out.append(m)
            continue
        if not isinstance(calls, list):
            raise ToolError(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
        shaped = []
        for j, c in enumerate(calls):
            f = c.get("function") if isinstance(c, dict) else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or \
                    not isinstance(f.get("arguments", "{}"), (str, dict)):
                raise ToolError(f"messages[{i}].tool_calls[{j}] must be {{\"function\": {{\"name\", \"arguments\"}}}}",
                                f"messages[{i}].tool_calls[{j}]")
            args: Any = f.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    raise ToolError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                                    f"messages[{i}].tool_calls[{j}]") from None
            shaped.append({"type": "function", "function": {"name": f["name"], "arguments": args}})
        out.append({**m, "tool_calls": shaped})
    return out


def _call(body: str, names: list[str] | None) -> dict | None:
    """A call in OpenAI's shape from its JSON, or None (not JSON, no name, a tool not offered)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or \
            (names is not None and obj["name"] not in names):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def parse_calls(text: str, names: list[str] | None = None) -> tuple[str | None, list[dict]]:
    """The answer's text outside its tool calls (None when there is none) and its calls in
    OpenAI's shape. A call whose JSON does not parse, lacks a name or names a tool not in
    `names` stays in the text. Small models often drop the tags and answer with the call's
    object alone, bare or fenced as JSON: an answer that is nothing but that, naming an offered
    tool, is that call."""
    calls: list[dict] = []
    kept: list[str] = []
    at = 0
    for m in _CALL.finditer(text):
        call = _call(m.group(1), names)
        if call is None:
            continue
        kept.append(text[at:m.start()])
        at = m.end()
        calls.append(call)
    kept.append(text[at:])
    content = "".join(kept).strip()
    if not calls and names is not None:
        whole = _WHOLE.match(content)
        call = _call(whole.group(1), names) if whole else None
        if call is not None:
            return None, [call]
    return (content or None), calls


_WHOLE = re.compile(r"^(?:```(?:json)?\s*)?(\{.*\})\s*(?:```)?$", re.S)


def visible_end(text: str) -> int:
    """How much of a streamed answer is plain text for certain: up to its first call, less a
    tail that may be the start of one; nothing while the whole answer may be a bare call."""
    head = text.lstrip()
    if head.startswith(("{", "```")) or "```".startswith(head):
        return 0
    i = text.find(OPEN)
    if i >= 0:
        return i
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return len(text) - n
    return len(text)
