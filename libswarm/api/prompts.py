"""A request's prompt as token ids: chat messages through the model's chat template (with the
request's tools), or a completion's text or token ids; and the prompt's text as echo returns it."""

from __future__ import annotations

from typing import Any

import torch

from libswarm.api.errors import ApiError
from libswarm.api.tools import ToolError, Tools, template_messages


def chat_prompt(tokenizer, messages: Any, tools: Tools | None = None) -> torch.Tensor:
    """The model's chat template applied to OpenAI messages (text content, tool calls and their
    results), with the request's tools; then the answer's opening when a call is required."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role must be system, developer, user, assistant or tool, got "
                           f"{role!r}", param=f"messages[{i}].role")
        content = m.get("content")
        if content is None and role == "assistant" and m.get("tool_calls"):
            content = ""
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}].content")
        turn = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls") is not None:
            turn["tool_calls"] = m["tool_calls"]
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            turn["tool_call_id"] = m["tool_call_id"]
        turns.append(turn)
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
    try:
        turns = template_messages(turns)
    except ToolError as e:
        raise ApiError(400, str(e), param=e.param) from None
    functions = tools.functions if tools is not None and tools.active else None
    try:
        ids = tokenizer.apply_chat_template(turns, tools=functions, add_generation_prompt=True, return_tensors="pt")
    except Exception as e:  # a template may raise on what it does not accept (e.g. roles out of turn)
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ApiError(400, f"the model's chat template refused these messages: {line}", param="messages") from None
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    if tools is not None and tools.prefill:
        opening = tokenizer(tools.prefill, add_special_tokens=False)["input_ids"]
        ids = torch.cat([ids, torch.tensor([opening], dtype=ids.dtype)], dim=1)
    return ids


def text_prompt(tokenizer, prompt: Any) -> torch.Tensor:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < len(tokenizer) for t in prompt):
            raise ApiError(400, f"prompt: token ids must be from 0 to {len(tokenizer) - 1}", param="prompt")
        return torch.tensor([prompt])
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt a request)",
                       param="prompt")
    return torch.tensor([tokenizer(prompt)["input_ids"]])


def prompt_text(tokenizer, data: dict, kind: str, prompt: torch.Tensor) -> str:
    """The prompt as echo returns it: as sent, or decoded from the token ids sent."""
    if kind != "completion" or not data.get("echo"):
        return ""
    given = data.get("prompt")
    if isinstance(given, list) and len(given) == 1:
        given = given[0]
    return given if isinstance(given, str) else tokenizer.decode(prompt[0].tolist())
