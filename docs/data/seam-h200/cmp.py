import json, sys
import numpy as np
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
ta, tb = json.load(open(sys.argv[1] + ".times.json")), json.load(open(sys.argv[2] + ".times.json"))
diff = [k for k in a.files if k not in b.files or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
print(f"arrays: old {len(a.files)} new {len(b.files)}; differing: {len(diff)}")
for k in diff[:30]:
    print("  DIFF", k, a[k].shape if k in a.files else None, b[k].shape if k in b.files else "missing")
print(f"{'case':44s} {'old ms':>8s} {'new ms':>8s} {'new/old':>8s}")
for k in ta:
    print(f"{k:44s} {ta[k]*1e3:8.3f} {tb[k]*1e3:8.3f} {tb[k]/ta[k]:8.3f}")
