"""One pass over each source's documents, shared by tokenizer training and packing.

A first run trains the tokenizer on a prefix of every source and then packs
every source whole. Reading a source is not free (decompression, JSON, and for
the ``stdlib`` sources parsing Python modules), so :class:`SharedDocuments`
reads each source once: the documents training pulled are kept (their number
is bounded by the training sample) and packing starts with them and then
continues the same reader where training stopped.
"""

from __future__ import annotations

from typing import Iterator, Optional

from lmlab.data.pretrain.sources import SourceConfig, iter_documents


class SharedDocuments:
    """The documents of a mixture's sources, each read at most once per prepare.

    :meth:`prefix` gives a source's documents from the start for a consumer
    that may stop early (tokenizer training) and remembers them;
    :meth:`whole` then gives all of the source's documents, the remembered
    ones first, and releases them as it goes. Both yield exactly what
    :func:`iter_documents` yields; a second :meth:`whole` reads the source anew.
    """

    def __init__(self, sources: list[SourceConfig]):
        self.sources = sources
        self._readers: dict[int, Iterator[str]] = {}
        self._seen: dict[int, list[str]] = {}

    def _reader(self, idx: int) -> Iterator[str]:
        if idx not in self._readers:
            self._readers[idx] = iter_documents(self.sources[idx], idx)
            self._seen[idx] = []
        return self._readers[idx]

    def prefix(self, idx: int) -> Iterator[str]:
        """Source ``idx`` from its first document; stop whenever enough were read."""
        reader = self._reader(idx)
        seen = self._seen[idx]
        yield from list(seen)
        for doc in reader:
            seen.append(doc)
            yield doc

    def whole(self, idx: int) -> Iterator[str]:
        """All documents of source ``idx``, read at most once in all."""
        reader = self._reader(idx)
        seen: Optional[list[str]] = self._seen.pop(idx)
        del self._readers[idx]  # a later call starts a fresh reader
        for i in range(len(seen)):
            doc, seen[i] = seen[i], None  # type: ignore[call-overload]  # free as packing goes
            yield doc
        seen = None
        yield from reader
