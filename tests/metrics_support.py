"""Read a ``/metrics`` answer the way Prometheus does: parsed, never matched as text."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """The samples of one exposition, by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self._samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self._samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name{labels}`` exactly, None when the exposition has none."""
        return self._samples.get((name, frozenset(labels.items())))

    def __getitem__(self, name: str) -> float:
        """The unlabelled sample ``name`` (KeyError when absent)."""
        return self._samples[(name, frozenset())]

    def names(self) -> set[str]:
        """Every sample name."""
        return {name for name, _ in self._samples}
