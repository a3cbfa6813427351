"""The shard set format that `m2d pack` (and `m2d wav2lms --shards`) writes and training reads: WebDataset
tar files `shard-NNNNNN.tar` of (1, F, T) LMS clips stored frame by frame, and an index.json that lists
each shard's size, SHA-256 and clips' byte offsets (see m2d/tools/pack.py and m2d/train/shards.py)."""

FORMAT = 'm2d-lms-shards'
VERSION = 1
INDEX_NAME = 'index.json'
DTYPES = ('float32', 'float16')


def shard_name(number: int) -> str:
    return f'shard-{number:06d}.tar'
