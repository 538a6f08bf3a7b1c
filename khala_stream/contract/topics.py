"""Topic and consumer-group naming: every name this product makes starts with the prefix."""

from __future__ import annotations

from dataclasses import dataclass

from khala_stream.contract.tables import SOURCE_TABLES


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = "khala"

    def source(self, table: str) -> str:
        return f"{self.prefix}.{table}"

    @property
    def sources(self) -> list[str]:
        return [self.source(t) for t in SOURCE_TABLES]

    @property
    def manifests(self) -> str:
        return f"{self.prefix}.manifests"

    @property
    def changes(self) -> str:
        return f"{self.prefix}.changes"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.dead-letters"

    @property
    def processor_group(self) -> str:
        return f"{self.prefix}.process"

    @property
    def sink_group(self) -> str:
        return f"{self.prefix}.sink"

    @property
    def owner(self) -> str:
        """Names the database these topics feed (`khala_stream/topic_owner.py`)."""
        return f"{self.prefix}.owner"

    @property
    def all(self) -> list[str]:
        return [*self.sources, self.manifests, self.changes, self.dead_letters, self.owner]
