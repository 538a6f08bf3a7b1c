"""The composition layer: the CLI, `import-chat`, the dry run, `dlq`, `counts` and the stage
supervisor. It wires the stages (`producers`, `processors`, `sinks`) on top of the kernel
(`khala_stream`); nothing below it imports it.
"""
