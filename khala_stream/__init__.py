"""khala-stream: Khala snapshot exports into the Laravel database, through Kafka."""

__version__ = "0.1.0"
