"""Data pipeline: canonical samples, importers, webdataset shards, decoding, exact resume, mixing.

Modules (imported explicitly, so `import omni_moe.data.schema` stays light):
`schema` (the canonical sample, `validate_sample`, `to_processor_messages`), `importers`
(LLaVA/Uni-MoE JSON, JSONL), `quality` (drop reasons, counters, strict mode, drop-rate ceiling),
`media` (image/audio/video decoding), `shards` (`build_shards`, `index.json`), `reader`
(`ShardDataset`), `loader` (`ResumableLoader`), `mixing` (`MixedShardDataset`), `testing`
(tiny media for tests), `synth` (the synthetic dataset).
"""
