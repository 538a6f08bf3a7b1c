"""Producers: read an export and publish its documents to Kafka."""
