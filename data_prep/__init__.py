"""dip-prep: shard image datasets into MosaicML Streaming (MDS) shards, locally or in S3."""
