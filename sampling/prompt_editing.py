"""AUTOMATIC1111's prompt editing: a prompt whose text changes during sampling.

    [from:to:when]   "from" until step `when`, then "to"; `when` a step (3) or, written with a point, a fraction
                     of the steps (0.5, 1.5 = past the end)
    [to:when]        nothing until `when`, then "to";      [from::when]  "from" until `when`, then nothing
    [a|b|c]          a different option at every step, in turn
Nested freely, with weights: "a [(cat:1.2):dog:0.4] on [grass|sand]". Any other text, brackets included, is left
for the weight parser (sampling/prompts.py): `[tag]` and `(tag:1.2)` are emphasis, not editing.

prompt_schedule reproduces A1111's get_learned_conditioning_prompt_schedules (modules/prompt_parser.py; its
doctests are tests/test_prompt_editing.py's cases): a list of (last step, text), the text used while the
sampler's step counter is <= its last step. As A1111, the counter counts denoiser calls, so second-order samplers
(two calls a step) get a schedule for twice the steps (sampling.names.SECOND_ORDER), and a prompt the grammar
cannot read (an unbalanced bracket inside an edit) is used as written.
"""

import itertools
import re

# the number ending an edit, then its closing bracket (lark's SIGNED_NUMBER, with optional spaces around)
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # text without syntax; a backslash escapes the next character


class _Unreadable(Exception):
    """The bracket construct being read is not one of the grammar's: read its bracket as text instead."""


def _sequence(text, i, stops):
    """Nodes from text[i] up to a character in `stops` (not consumed) -> (nodes, index). A node is a string,
    ("group", open, nodes, close), ("edit", before or None, after, when text) or ("alternate", [nodes...])."""
    nodes = []
    while i < len(text) and text[i] not in stops:
        if text[i] in "[(":
            node, i = _bracket(text, i)
            nodes.append(node)
        elif (plain := _PLAIN.match(text, i)) is not None:
            nodes.append(plain.group(0))
            i = plain.end()
        else:  # a stray ] ) : | or a lone trailing backslash, where the enclosing construct allows none
            raise _Unreadable
    return nodes, i


def _bracket(text, i):
    """The construct opening at text[i] ("(" or "[") -> (node, index after it)."""
    if text[i] == "(":  # "(" prompt ")" or "(" prompt ":" prompt ")": emphasis, kept as text around its edits
        inner, j = _sequence(text, i + 1, "):")
        if j < len(text) and text[j] == ":":
            weight, j = _sequence(text, j + 1, ")")
            inner = [*inner, ":", *weight]
        if j >= len(text):
            raise _Unreadable
        return ("group", "(", inner, ")"), j + 1
    first, j = _sequence(text, i + 1, ":|]")
    if j >= len(text):
        raise _Unreadable
    if text[j] == "]":  # [prompt]: emphasis
        return ("group", "[", first, "]"), j + 1
    if text[j] == "|":  # [a|b|...]: alternation (options may be empty)
        options = [first]
        while j < len(text) and text[j] == "|":
            option, j = _sequence(text, j + 1, "|]")
            options.append(option)
        if j >= len(text):
            raise _Unreadable
        return ("alternate", options), j + 1
    if (when := _WHEN.match(text, j + 1)) is not None:  # [to:when]
        return ("edit", None, first, when.group(1)), when.end()
    second, k = _sequence(text, j + 1, ":]")
    if k < len(text) and text[k] == ":" and (when := _WHEN.match(text, k + 1)) is not None:  # [from:to:when]
        return ("edit", first, second, when.group(1)), when.end()
    raise _Unreadable


def _parse(prompt):
    """The prompt's nodes; a bracket that opens no readable construct is text (A1111's start rule lets stray
    [ ] ( ) : stand at the top level), and a stray | or a trailing backslash makes the prompt unreadable (None)."""
    nodes, i = [], 0
    while i < len(prompt):
        if prompt[i] in "[(":
            try:
                node, i = _bracket(prompt, i)
                nodes.append(node)
            except _Unreadable:
                nodes.append(prompt[i])
                i += 1
        elif prompt[i] in "]):":
            nodes.append(prompt[i])
            i += 1
        elif (plain := _PLAIN.match(prompt, i)) is not None:
            nodes.append(plain.group(0))
            i = plain.end()
        else:
            return None
    return nodes


def _walk(nodes):
    for node in nodes:
        if isinstance(node, tuple):
            yield node
            children = [node[2]] if node[0] == "group" else [node[1] or [], node[2]] if node[0] == "edit" else node[1]
            for child in children:
                yield from _walk(child)


def _when(text, steps, first_pass_steps):
    """An edit's step: a number with a point is a fraction of the steps. In a hi-res pass (first_pass_steps set)
    both count from the start of the first pass, as A1111's do."""
    value = float(text)
    if first_pass_steps is None:
        value = value * steps if "." in text else value
    else:
        value = (value - 1) * steps if "." in text else value - first_pass_steps
    return min(steps, int(value))


def _render(nodes, step, steps, first_pass_steps):
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif node[0] == "group":
            parts += [node[1], _render(node[2], step, steps, first_pass_steps), node[3]]
        elif node[0] == "edit":
            before_or_after = node[1] or [] if step <= _when(node[3], steps, first_pass_steps) else node[2]
            parts.append(_render(before_or_after, step, steps, first_pass_steps))
        else:
            parts.append(_render(node[1][(step - 1) % len(node[1])], step, steps, first_pass_steps))
    return "".join(parts)


def prompt_schedule(prompt, steps, first_pass_steps=None):
    """[(last step, text)], in order: the text in use while the step counter (0, 1, ...) is <= last step.
    steps: the denoiser calls the schedule spans; first_pass_steps: for a hi-res pass, the first pass's."""
    nodes = _parse(prompt)
    if nodes is None:
        return [(steps, prompt)]
    ends = {steps}
    for node in _walk(nodes):
        if node[0] == "edit" and _when(node[3], steps, first_pass_steps) >= 1:
            ends.add(_when(node[3], steps, first_pass_steps))
        elif node[0] == "alternate":
            ends.update(range(1, steps + 1))
    return [(end, _render(nodes, end, steps, first_pass_steps)) for end in sorted(ends)]


def text_at(schedule, call):
    """The text of `schedule` at denoiser call `call` (0-based): the first entry whose last step is >= call."""
    return next((text for end, text in schedule if call <= end), schedule[-1][1])


def at_call(nets, lasts, first_call=0):
    """One net that runs nets[j] while its call counter (from first_call) is <= lasts[j], then the next."""
    if len(nets) == 1:
        return nets[0]
    calls = itertools.count(first_call)

    def net(*args, **kwargs):
        call = next(calls)
        return nets[next((j for j, last in enumerate(lasts) if call <= last), len(nets) - 1)](*args, **kwargs)

    return net
