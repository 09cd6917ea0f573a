import importlib
import pkgutil
import sys
import time
from pathlib import Path


def main(argv):
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                   if m.name.startswith("bench_"))
    chosen = [n for n in names if not argv or n in argv]
    unknown = [a for a in argv if a not in names]
    if unknown:
        print(f"bench: unknown benchmark(s) {unknown}; available: {names}", file=sys.stderr)
        return 2
    for name in chosen:
        print(f"\n=== bench {name} ===", flush=True)
        t0 = time.perf_counter()
        importlib.import_module(f"bench.bench_{name}").main()
        print(f"=== {name} done in {time.perf_counter() - t0:.1f} s ===", flush=True)
    return 0


sys.exit(main(sys.argv[1:]))
