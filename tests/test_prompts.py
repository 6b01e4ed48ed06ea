import pytest

from dreamguide.prompts import base_prompt, contains_token, format_prompt


@pytest.mark.parametrize(
    "prompt, token, class_word, want",
    [
        ("a <sks> dog in the snow", "<sks>", "dog", "a dog in the snow"),
        ("a watercolor painting of <sks>", "<sks>", "dog", "a watercolor painting of dog"),
        ("a sks dog on the beach", "sks", "dog", "a dog on the beach"),
        ("a sks stuffed animal on the beach", "sks", "stuffed animal", "a stuffed animal on the beach"),
        ("sks, in the jungle", "sks", "toy", "toy, in the jungle"),
        ("a <s0><s1> cat with a hat", "<s0><s1>", "cat", "a cat with a hat"),
        ("a sks doghouse", "sks", "dog", "a dog doghouse"),
    ],
)
def test_base_prompt(prompt, token, class_word, want):
    assert base_prompt(prompt, token, class_word) == want


def test_token_must_be_whole():
    assert not contains_token("she asks a dog", "sks")
    with pytest.raises(ValueError, match=r"'she asks a dog' does not contain the token 'sks'"):
        base_prompt("she asks a dog", "sks", "dog")


def test_empty_token_or_class_word():
    with pytest.raises(ValueError, match="token is empty"):
        base_prompt("a dog", "", "dog")
    with pytest.raises(ValueError, match="class word"):
        base_prompt("a sks dog", "sks", " ")


def test_format_prompt():
    assert format_prompt("a watercolor painting of {}", "sks", "dog") == (
        "a watercolor painting of sks dog",
        "a watercolor painting of dog",
    )
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        format_prompt("a dog", "sks", "dog")
