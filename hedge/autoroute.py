"""`gammainfra/auto`: a task-aware choice of model chain (README "gammainfra/auto").

The heuristic is deliberately simple, cheap (one pass over the text, no model) and documented:

1. **Classify** the request into one task class, first match wins:
   - `tools`: the body has `tools` or `functions`;
   - `long-context`: the prompt is estimated (characters / 4) above 16,000 tokens;
   - `code`: a code fence, or at least two code signals (`def `, `class `, `function `, `import `,
     `#include`, `SELECT `, `=>`, `{`/`}` pairs, `;` line ends, words like "python", "javascript",
     "stack trace", "compile", "bug", "refactor");
   - `reasoning`: words such as "prove", "step by step", "derive", "calculate", "solve", "why";
   - `chat`: everything else (short chat).
2. **Pick the chain**: the route's candidate models tagged with that class (`tags` in the model config);
   if none is tagged, all of them.
3. **Order** by the cost/quality dial x (X-GammaInfra-Cost-Quality, default 0.5): score =
   x * quality - (1 - x) * relative price, where relative price is the model's blended price divided by
   the chain's most expensive; higher first, config order on ties. x = 0 is cheapest-first, x = 1 is
   best-first. The chain then runs as failover (pinned semantics).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .catalog import Candidate
from .request import ChatRequest

LONG_CONTEXT_TOKENS = 16_000
_FENCE = "```"
_CODE_SIGNALS = re.compile(
    r"\bdef \w+\(|\bclass \w+|\bfunction\b|\bimport \w+|#include|\bSELECT\b|=>|;\s*$|\{[^{}]*\}|"
    r"\b(python|javascript|typescript|golang|rust|java|sql|stack ?trace|traceback|compile[rd]?|bug|"
    r"refactor|regex)\b",
    re.IGNORECASE | re.MULTILINE,
)
_REASONING = re.compile(
    r"\b(prove|proof|step[- ]by[- ]step|derive|calculate|solve|theorem|why does|why is|reason about)\b",
    re.IGNORECASE,
)
CLASSES = ("tools", "long-context", "code", "reasoning", "chat")


def _text(req: ChatRequest) -> str:
    parts: list[str] = []
    for m in req.body["messages"]:
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts.extend(p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


def classify(req: ChatRequest) -> str:
    if req.body.get("tools") or req.body.get("functions"):
        return "tools"
    if req.prompt_tokens_estimate > LONG_CONTEXT_TOKENS:
        return "long-context"
    text = _text(req)
    if _FENCE in text or len(_CODE_SIGNALS.findall(text, 0, 20_000)) >= 2:
        return "code"
    if _REASONING.search(text, 0, 20_000):
        return "reasoning"
    return "chat"


def choose_chain(task: str, cands: Sequence[Candidate], dial: float) -> tuple[Candidate, ...]:
    """The candidates tagged for `task`, best first for the dial (see the module docstring)."""
    chain = [c for c in cands if task in c.model.tags] or list(cands)
    from .feedback import blended_price

    top = max(blended_price(c) for c in chain) or 1.0
    order = {c.endpoint: i for i, c in enumerate(chain)}
    chain.sort(
        key=lambda c: (-(dial * c.model.quality - (1 - dial) * blended_price(c) / top), order[c.endpoint])
    )
    return tuple(chain)
