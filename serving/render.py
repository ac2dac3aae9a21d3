"""Rendering for the Chatbot: turns as messages, spoken clips kept in the history, thinking-mode replies split into a
collapsible reasoning block and an answer with its boxed result."""

from __future__ import annotations

import re

from .conversation import Turn


THINK_CLOSE = re.compile(r"</think(?:ing)?>|<answer>")
TAGS = re.compile(r"</?(?:think|thinking|answer)>")
PARTIAL_TAG = re.compile(r"<[/a-z]{0,9}$")


def split_thinking(reply: str) -> tuple[str, str, bool]:
    """(reasoning, answer, reasoning finished). Text before the first closing tag (</think>, </thinking> or
    <answer>) is reasoning: the chain-of-thought prompt makes the model start with it."""
    close = THINK_CLOSE.search(reply)
    reasoning, answer = (reply[:close.start()], reply[close.end():]) if close else (reply, "")
    clean = lambda s: PARTIAL_TAG.sub("", TAGS.sub("", s)).strip()  # noqa: E731
    return clean(reasoning), clean(answer), close is not None


def boxed_results(text: str) -> list[str]:
    r"""The contents of every \boxed{...} (nested braces allowed)."""
    results, start = [], 0
    while (i := text.find("\\boxed{", start)) >= 0:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            break
        results.append(text[i + len("\\boxed{"):j - 1])
        start = j
    return results


def user_message(turn: Turn) -> dict:
    content: list = [{"path": path} for _, path in turn.media]
    if turn.text:
        content.append(turn.text)
    return {"role": "user", "content": content}


def chat_messages(turns: list[Turn], pending: bool = False) -> list[dict]:
    """Chatbot messages: each turn's text and media, the reply, and its spoken clip (replayable, downloadable)."""
    messages = []
    for t, turn in enumerate(turns):
        messages.append(user_message(turn))
        streaming = pending and t == len(turns) - 1
        reply = turn.reply or ((f"*{turn.status}*" if turn.status else "…") if streaming else "")
        content: list = [reply] if reply else []
        if turn.reply_audio:
            content.append({"path": turn.reply_audio, "mime_type": "audio/wav"})
        if content:
            messages.append({"role": "assistant", "content": content})
    return messages


def thinking_chat_messages(turns: list[Turn], pending: bool = False) -> list[dict]:
    """Reasoning in a collapsible "Thinking" block (open with a spinner while it streams), the answer below it
    with any \\boxed{} result repeated as the final result."""
    messages = []
    for t, turn in enumerate(turns):
        messages.append(user_message(turn))
        reasoning, answer, finished = split_thinking(turn.reply)
        streaming = pending and t == len(turns) - 1
        thinking_done = finished or not streaming
        metadata = {"title": "Thinking", "status": "done" if thinking_done else "pending"}
        if thinking_done:
            metadata["duration"] = round(turn.seconds, 1)
        messages.append({"role": "assistant", "content": reasoning or "…", "metadata": metadata})
        if answer:
            results = boxed_results(answer)
            if results:
                answer += "\n\n**Final result:** " + ", ".join(f"$\\boxed{{{r}}}$" for r in results)
            messages.append({"role": "assistant", "content": answer})
        elif not streaming:
            messages.append({"role": "assistant",
                             "content": "*(no final answer: the model did not finish its reasoning)*"})
    return messages
