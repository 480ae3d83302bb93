"""Coverage-guided fuzzing (atheris / libFuzzer) of the stored-chunk reader: lmcache_core.codec.decode and
lmcache_core.serde.unpack. Only CorruptChunkError may escape; a chunk that decodes has the shape and dtype
its header (and the reader's `expect`) say.

Each input is either raw bytes handed to the decoder, or edits of a valid seed chunk (every codec, signed or
not) with the header checksum recomputed half of the time, so the fuzzer reaches the field checks a forger
has to pass. Run (from the repository root):

    .venv/bin/python fuzz/fuzz_chunk.py -max_total_time=3600 -rss_limit_mb=4096 fuzz/corpus/chunk

libFuzzer flags apply (-jobs=N -workers=N for parallel runs); crashes are written as crash-* files
(-artifact_prefix=DIR/ to put them elsewhere) and replay with `python fuzz/fuzz_chunk.py crash-<id>`.
"""

import struct
import sys

import atheris

with atheris.instrument_imports(include=["lmcache_core"]):
    import torch
    import xxhash

    from lmcache_core import codec, serde
    from lmcache_core.errors import CorruptChunkError

KEY = bytes(range(32))
SECRET = b"fuzz-secret"
SEEDS = []
for _name in serde.CHUNK_CODECS:
    for _shape in ((2, 2, 16, 2, 8), (1, 1, 64, 16)):
        _kv = torch.randn(_shape, generator=torch.Generator().manual_seed(len(SEEDS))).to(torch.bfloat16)
        for _secret in (None, SECRET):
            SEEDS.append((codec.encode(KEY, _kv, _name, secret=_secret), _kv.shape, _secret))


def _edit(fdp: atheris.FuzzedDataProvider, blob: bytes) -> bytes:
    buf = bytearray(blob)
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        op = fdp.ConsumeIntInRange(0, 4)
        if not buf:
            break
        if op == 0 and len(buf) >= 120:  # overwrite a header field with a chosen integer
            offset = fdp.ConsumeIntInRange(4, 119)
            size = fdp.PickValueInList([1, 2, 4, 8])
            offset = min(offset, 120 - size)
            struct.pack_into(f"<{'BHIQ'[[1, 2, 4, 8].index(size)]}", buf, offset,
                             fdp.ConsumeIntInRange(0, 2 ** (8 * size) - 1))
        elif op <= 1:  # flip a bit anywhere
            i = fdp.ConsumeIntInRange(0, len(buf) - 1)
            buf[i] ^= 1 << fdp.ConsumeIntInRange(0, 7)
        elif op == 2:  # truncate
            del buf[fdp.ConsumeIntInRange(0, len(buf)):]
        elif op == 3:  # replace the payload (a forger writing its own bytes)
            header_len = 160 if len(buf) > 8 and buf[8] & 1 else 128
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
            buf = buf[:header_len] + bytearray(payload)
            if len(buf) >= 120:
                struct.pack_into("<Q", buf, 112, xxhash.xxh3_64_intdigest(payload))
        else:  # insert bytes
            i = fdp.ConsumeIntInRange(0, len(buf))
            buf[i:i] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 32))
    if len(buf) >= 128 and fdp.ConsumeBool():  # recompute the header checksum, as a forger would
        struct.pack_into("<Q", buf, 120, xxhash.xxh3_64_intdigest(bytes(buf[:120])))
    return bytes(buf)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        blob, shape, secret = SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)]
        bad = _edit(fdp, blob)
    else:
        blob, shape, secret = None, None, None
        bad = fdp.ConsumeBytes(fdp.remaining_bytes())
    expect = (tuple(shape), torch.bfloat16) if shape is not None and data[:1] < b"\x80" else None
    try:
        serde.unpack(bad, KEY, secret=secret)
    except CorruptChunkError:
        pass
    try:
        out, _ = codec.decode(bad, KEY, secret=secret, expect=expect)
    except CorruptChunkError:
        return
    header = serde.unpack_header(bad)
    assert tuple(out.shape) == header.shape and out.dtype == header.dtype, (out.shape, header)
    if expect is not None:
        assert (tuple(out.shape), out.dtype) == expect
    if secret is not None:
        assert bad == blob or blob is None, "an edited chunk passed the MAC"


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
