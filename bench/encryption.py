"""Client-side encryption throughput: the streaming AEAD (format v2, Tink AES-256-GCM-HKDF,
1 MiB segments) side by side with the single AES-GCM stream it replaced (format v1), on the same
data in the same run. One core each way, in-process, 4 MiB chunks as the data path uses.

    python bench/encryption.py [--mib 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks run as plain scripts from a checkout

from tasks.streams import decrypt, encrypt, encrypt_v1  # noqa: E402

CHUNK = 4 << 20


def _best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    key = os.urandom(32)
    block = os.urandom(CHUNK)
    n = max(1, args.mib * (1 << 20) // CHUNK)
    total_mib = n * CHUNK / (1 << 20)
    results = {}
    for name, enc in (("v1 single AES-GCM stream", encrypt_v1), ("v2 streaming AEAD (Tink)", encrypt)):
        blob = b"".join(enc((block for _ in range(n)), key))
        chunks = [blob[i : i + CHUNK] for i in range(0, len(blob), CHUNK)]

        def do_encrypt(enc=enc) -> None:  # type: ignore[no-untyped-def]
            for _ in enc((block for _ in range(n)), key):
                pass

        def do_decrypt(chunks=chunks) -> None:  # type: ignore[no-untyped-def]
            for _ in decrypt(iter(chunks), key, "bench"):
                pass

        e = _best(do_encrypt, args.repeat)
        d = _best(do_decrypt, args.repeat)
        results[name] = {
            "encrypt_mib_s": round(total_mib / e),
            "decrypt_mib_s": round(total_mib / d),
            "overhead_bytes": len(blob) - n * CHUNK,
        }
        print(
            f"{name:28s} encrypt {total_mib / e:7.0f} MiB/s   decrypt {total_mib / d:7.0f} MiB/s   "
            f"overhead {len(blob) - n * CHUNK} bytes on {total_mib:.0f} MiB"
        )
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "encryption.json").write_text(json.dumps({"mib": total_mib, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
