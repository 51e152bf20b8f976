"""Chat templates rendered as transformers' apply_chat_template(..., add_generation_prompt=True)
renders them: jinja2's sandbox with trim_blocks and lstrip_blocks, and the helpers transformers
gives templates (raise_exception, a tojson that keeps non-ASCII, strftime_now). The messages are
checked first, so that a mistake in them is reported by name instead of as a template failure."""
import json
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
# The names of an assistant turn's reasoning; transformers fills the first two from the first given.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes HTML characters and accepts no separators: transformers' does not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _environment():
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


class ChatTemplate:
    """A compiled chat template and the named special tokens it may use (bos_token, eos_token...)."""

    def __init__(self, source, special_tokens):
        if not isinstance(source, str):
            raise ValueError(f"the chat template must be a string, got {type(source).__name__}")
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as error:
            raise ValueError(f"chat template does not compile: {error}") from None
        self._special_tokens = dict(special_tokens)

    def render(self, messages, tools=None, enable_thinking=None, add_generation_prompt=True):
        """The prompt string. enable_thinking=None leaves the variable undefined for the template
        (Qwen3's then thinks, as with True)."""
        messages = check_messages(messages)
        tools = check_tools(tools)
        if enable_thinking is not None and not isinstance(enable_thinking, bool):
            raise ValueError(f"enable_thinking must be True, False or None, got {enable_thinking!r}")
        variables = {**self._special_tokens, "messages": messages, "tools": tools, "documents": None,
                     "add_generation_prompt": add_generation_prompt}
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as error:  # raise_exception, undefined names, sandbox refusals
            raise ValueError(f"chat template error: {error}") from None
        except Exception as error:  # the template is code from the checkpoint: any failure of it is its error
            raise ValueError(f"chat template error: {type(error).__name__}: {error}") from None


def check_messages(messages):
    """Copies of the messages as plain dicts, checked: a non-empty list of objects, each with a known
    role and string content (an assistant turn may carry tool_calls instead). Keys whose value is
    None are dropped and reasoning aliases filled, as transformers does."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} objects, "
                         f"got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with role and content, got {type(message).__name__}")
        message = {key: value for key, value in message.items() if value is not None}
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if "content" in message and not isinstance(message["content"], str):
            raise ValueError(f"{where}.content must be a string, got {type(message['content']).__name__}")
        if "content" not in message and not (role == "assistant" and message.get("tool_calls")):
            raise ValueError(f"{where} has no content")
        if "tool_calls" in message:
            _check_tool_calls(message["tool_calls"], f"{where}.tool_calls")
        reasoning = next((message[field] for field in REASONING_FIELDS if field in message), None)
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise ValueError(f"{where}.reasoning_content must be a string")
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        checked.append(message)
    return checked


def _check_tool_calls(tool_calls, where):
    if not isinstance(tool_calls, list):
        raise ValueError(f"{where} must be a list")
    for j, call in enumerate(tool_calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}[{j}] must be an object with a function name")
        if not isinstance(function.get("arguments"), (dict, str)):
            raise ValueError(f"{where}[{j}].arguments must be an object or a JSON string")


def check_tools(tools):
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(tool, dict) for tool in tools):
        raise ValueError("tools must be a list of JSON-schema objects")
    return list(tools)
