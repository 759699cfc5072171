"""kohya's caption options, as its dataset applies them to a caption each time an image is drawn
(train_util.BaseDataset.process_caption, in its order): the prefix and suffix; the whole caption dropped at
a rate; wildcards (`{a|b}`, one line of several) or else the first line; the tags split at a separator,
those before `keep_tokens` (or before `keep_tokens_separator`, and after its second use) kept in place, the
others shuffled and dropped one by one at a rate, joined with ", "; a secondary separator turned into the
separator. kohya's token warm-up and its dropout every n epochs are not done here (kohya_options.REFUSED)."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionRules:
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    prefix: str = ""
    suffix: str = ""
    separator: str = ","
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    tag_dropout_rate: float = 0.0
    wildcard: bool = False

    @classmethod
    def of(cls, cfg) -> "CaptionRules":
        return cls(cfg.shuffle_caption, cfg.keep_tokens, cfg.caption_dropout_rate, cfg.caption_prefix,
                   cfg.caption_suffix, cfg.caption_separator, cfg.keep_tokens_separator, cfg.secondary_separator,
                   cfg.caption_tag_dropout_rate, cfg.enable_wildcard)


def process(caption: str, rng: random.Random, rules: CaptionRules = CaptionRules()) -> str:
    if rules.prefix:
        caption = rules.prefix + " " + caption
    if rules.suffix:
        caption = caption + " " + rules.suffix
    if rules.dropout_rate and rng.random() < rules.dropout_rate:
        return ""
    caption = _wildcards(caption, rng) if rules.wildcard else caption.split("\n")[0]
    if rules.shuffle or rules.tag_dropout_rate:
        fixed, flex, fixed_end = _split(caption, rules)
        if rules.shuffle:
            rng.shuffle(flex)
        if rules.tag_dropout_rate:
            flex = [t for t in flex if rng.random() >= rules.tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_end)
    if rules.secondary_separator:
        caption = caption.replace(rules.secondary_separator, rules.separator)
    return caption


def _split(caption: str, rules: CaptionRules) -> tuple[list, list, list]:
    """(tags kept at the start, tags that move, tags kept at the end)."""
    def tags(text):
        return [t.strip() for t in text.split(rules.separator) if t.strip()]

    marker = rules.keep_tokens_separator
    if marker and marker in caption:
        head, rest = caption.split(marker, 1)
        rest, _, tail = rest.partition(marker)
        return tags(head), tags(rest), tags(tail)
    every = [t.strip() for t in caption.strip().split(rules.separator)]
    return every[:rules.keep_tokens], every[rules.keep_tokens:], []


def _wildcards(caption: str, rng: random.Random) -> str:
    """One line of several, then each `{a|b|c}` one of its choices (`{{` and `}}` are braces)."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    left, right = "\x00", "\x01"
    caption = caption.replace("{{", left).replace("}}", right)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(left, "{").replace(right, "}")
