"""What every section of the analysis report is given, and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condcomp.analyze.collect import Recorded
from condcomp.analyze.document import Block, code
from condcomp.analyze.stats import TokenShare
from condcomp.data import Tokenizer
from condcomp.report import RunSummary

# A token must occur this often among the analysed tokens before its share routed somewhere
# is ranked: a token seen twice and routed twice would otherwise top every list with 100%.
MIN_TOKEN_COUNT = 8
TOP_TOKENS = 5  # tokens listed per expert, or per end of a Mixture-of-Depths ranking
# Characters a token's text would lose or break a table with, shown as visible marks.
_VISIBLE = str.maketrans({" ": "\u2423", "\n": "\\n", "\t": "\\t", "\r": "\\r"})


@dataclass
class Context:
    """The recorded decisions, the run they came from, and where the figures go."""

    recorded: Recorded
    out_dir: Path
    tokenizer: Tokenizer
    run: RunSummary  # the run's name and metrics.jsonl rows
    has_metrics: bool  # False where the run has no metrics.jsonl (an imported model)
    min_count: int = MIN_TOKEN_COUNT
    top: int = TOP_TOKENS

    def token_text(self, token: int) -> str:
        """A token id as a code span of its text, spaces and line ends made visible."""
        return code(self.tokenizer.decode([token]).translate(_VISIBLE))

    def shares_text(self, shares: list[TokenShare]) -> str:
        """Tokens with their shares for a table cell: ``the`` 92.0% (45/49), ..."""
        return ", ".join(f"{self.token_text(s.token)} {percent(s.share)} ({s.hits}/{s.count})"
                         for s in shares) or "-"

    def shares_numbers(self, shares: list[TokenShare]) -> list[dict[str, Any]]:
        """Tokens with their shares for analysis.json."""
        return [{"token": s.token, "text": self.tokenizer.decode([s.token]), "share": s.share,
                 "routed": s.hits, "seen": s.count} for s in shares]


@dataclass
class Section:
    """A family's part of the report: its blocks, and its numbers for ``analysis.json``."""

    key: str  # its name in analysis.json
    blocks: list[Block]
    numbers: dict[str, Any] = field(default_factory=dict)


def layer_label(path: str) -> str:
    """``"layers.3.block.ffn"`` -> ``"layer 3"``: the index a reader counts by."""
    parts = path.split(".")
    return f"layer {parts[1]}" if len(parts) > 1 and parts[0] == "layers" else path


def percent(share: float) -> str:
    return f"{100 * share:.1f}%"
