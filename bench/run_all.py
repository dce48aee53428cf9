"""`make bench`: run every benchmark script in bench/ one after another."""

import glob
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
failed = []
for script in sorted(glob.glob(os.path.join(here, "bench_*.py"))):
    print(f"\n=== {os.path.basename(script)} ===", flush=True)
    r = subprocess.run([sys.executable, script], cwd=os.path.dirname(here))
    if r.returncode:
        failed.append(os.path.basename(script))
print("\nfailed:", ", ".join(failed) if failed else "none")
sys.exit(1 if failed else 0)
