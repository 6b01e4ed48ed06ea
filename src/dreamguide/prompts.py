"""Token prompts and base prompts (SPEC section 1).

The personalized model sees the token prompt ("a <sks> dog in the snow"); the pretrained
model sees the base prompt, the same text with the identifier token replaced by the class
word ("a dog in the snow"). When the token already stands before its class word, as in
DreamBench's "a {token} {class}" prompts, the token is simply removed.
"""

from __future__ import annotations

import re


def _token_pattern(token: str) -> re.Pattern:
    # Whole-token match: "sks" must not match inside "asks"; tokens like "<sks>" have no word edges.
    left = r"(?<![\w])" if token[:1].isalnum() or token[:1] == "_" else ""
    right = r"(?![\w])" if token[-1:].isalnum() or token[-1:] == "_" else ""
    return re.compile(left + re.escape(token) + right)


def contains_token(prompt: str, token: str) -> bool:
    """True if ``token`` occurs in ``prompt`` as a whole token."""
    return bool(token) and _token_pattern(token).search(prompt) is not None


def base_prompt(token_prompt: str, token: str, class_word: str) -> str:
    """The prompt with ``token`` replaced by ``class_word`` ("a <sks> dog" -> "a dog")."""
    if not token or not token.strip():
        raise ValueError("the identifier token is empty; pass the token the subject was trained with, e.g. '<sks>'")
    if not class_word or not class_word.strip():
        raise ValueError(f"the class word for token {token!r} is empty; pass the subject's class, e.g. 'dog'")
    pattern = _token_pattern(token)
    if not pattern.search(token_prompt):
        raise ValueError(
            f"the prompt {token_prompt!r} does not contain the token {token!r}; "
            f"write it into the prompt, e.g. 'a photo of {token} {class_word}'"
        )
    followed_by_class = re.compile(pattern.pattern + r"\s+(?=" + re.escape(class_word) + r"(?![\w]))")
    text = followed_by_class.sub("", token_prompt)
    text = pattern.sub(class_word, text)
    return re.sub(r"\s{2,}", " ", text).strip()


def format_prompt(template: str, token: str, class_word: str) -> tuple[str, str]:
    """Fill a DreamBench-style template whose ``{}`` stands for "<token> <class>"; return (token, base) prompts."""
    if "{}" not in template:
        raise ValueError(f"the prompt template {template!r} has no '{{}}' where the subject goes")
    return template.replace("{}", f"{token} {class_word}"), template.replace("{}", class_word)
